/* Compiled with -fcf-protection=full -fpie: endbr64 first, RIP-relative jump tables, notrack jumps. */
extern int helper(int);
int cet_switch(int x) {
    switch (x) {
    case 0: return helper(1);
    case 1: return 22;
    case 2: return x * 5 + 3;
    case 3: return helper(x) + 4;
    case 4: return 59;
    case 5: return x << 4;
    case 6: return 71;
    default: return -1;
    }
}
int cet_loop(const int *a, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s ^= a[i] + i;
    return s;
}
extern int counter;
int cet_load(int x) { return counter * 3 + x; }
