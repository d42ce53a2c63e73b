mov eax, 0x11223344
mov rax, 0x1122334455667788
mov al, 0x12
mov ax, 0x1234
mov r8d, 0x11223344
mov r15b, 0x7f
mov dword ptr [rsi + 0x40], eax
mov qword ptr [rsp + 8], rbx
mov word ptr [rsp + 8], ax
mov byte ptr [rbp - 1], cl
mov eax, dword ptr [rip + 0x1000]
mov word ptr [rip + 0x1000], ax
mov word ptr [rip + 0x1000], 0x1234
mov dword ptr [rip + 0x1000], 0x11223344
mov qword ptr [rip + 0x1000], -1
mov byte ptr [rip + 0x1000], 0x12
mov ax, word ptr [rax + 0x100]
mov ax, word ptr [rax + rbx*4 + 0x11223344]
mov eax, dword ptr [rax + rbx*4 + 0x11223344]
mov eax, dword ptr [rbx*8 + 0x1000]
mov eax, dword ptr [0x1000]
mov eax, dword ptr [r12]
mov eax, dword ptr [r13]
mov eax, dword ptr [r13 + r14*2 + 0x10]
mov eax, dword ptr fs:[0x28]
mov rax, qword ptr gs:[rax + 0x10]
mov eax, dword ptr [eax + 0x10]
mov eax, dword ptr [ebx + ecx*4]
mov ax, word ptr [eip + 0x100]
movabs eax, dword ptr [0x1122334455667788]
movabs qword ptr [0x1122334455667788], rax
movabs al, byte ptr [0x1122334455667788]
movzx eax, byte ptr [rsi]
movsx rax, word ptr [rdi + 2]
movsxd rax, dword ptr [rdi + 4]
lea rax, [rip + 0x1000]
lea eax, [rax + rax*2]
add eax, 0x11223344
add ax, 0x1234
add al, 0x12
add dword ptr [rsi], 0x11223344
add word ptr [rsi], 0x1234
add word ptr [rsi + 0x11223344], 0x12
add dword ptr [rsi], 1
add qword ptr [rip + 0x100], 0x12
sub rsp, 0x28
and ecx, 0xff
or byte ptr [rdi], 0x80
xor eax, eax
cmp dword ptr [rip + 0x1000], 0x11223344
cmp word ptr [rip + 0x1000], 0x1234
cmp byte ptr [rip + 0x1000], 0x12
test byte ptr [rip + 0x1000], 0x12
test word ptr [rip + 0x1000], 0x1234
test dword ptr [rsi], 0x11223344
test eax, 0x11223344
test ax, 0x1234
test al, 1
imul eax, dword ptr [rsi], 0x11223344
imul ax, word ptr [rsi], 0x1234
imul eax, ecx, 0x12
imul ax, word ptr [rip + 0x100], 0x12
imul ax, word ptr [rip + 0x100], 0x1234
shl dword ptr [rsi], 5
shr ax, 3
rol word ptr [rip + 0x100], 3
sar rax, cl
not qword ptr [rax]
neg dword ptr [rbx]
inc word ptr [rip + 0x100]
dec byte ptr [rax]
mul ecx
div qword ptr [rsi]
xchg eax, dword ptr [rsi]
xadd dword ptr [rsi], eax
cmpxchg qword ptr [rsi], rcx
lock cmpxchg qword ptr [rsi], rcx
lock add dword ptr [rip + 0x100], 1
lock xadd word ptr [rsi], ax
lock inc dword ptr [rsi]
cmpxchg8b qword ptr [rsi]
cmpxchg16b xmmword ptr [rsi]
bt eax, 5
bts dword ptr [rsi], 5
btr word ptr [rip + 0x100], 3
bsf eax, ecx
popcnt eax, dword ptr [rsi]
lzcnt eax, ecx
tzcnt rax, qword ptr [rip + 0x100]
shld eax, ecx, 3
shrd word ptr [rip + 0x100], ax, 3
cmove eax, dword ptr [rsi]
sete byte ptr [rsi]
setne al
push rax
push r12
push 0x12
push 0x11223344
push qword ptr [rip + 0x100]
pop rbx
pop qword ptr [rsi]
pushfq
popfq
push fs
pop gs
enter 0x10, 1
leave
ret
ret 8
retf
call rax
call qword ptr [rip + 0x100]
call qword ptr [rax + 8]
jmp rax
jmp qword ptr [rip + 0x100]
jmp qword ptr [rax*8 + 0x1000]
notrack jmp rax
in al, 0x60
in ax, 0x60
in eax, 0x60
in al, dx
in ax, dx
in eax, dx
out 0x80, al
out 0x80, ax
out 0x80, eax
out dx, al
out dx, ax
out dx, eax
insb
insw
insd
outsb
outsw
outsd
rep insb
rep outsb
rep outsw
movsb
movsw
movsd
movsq
rep movsb
rep movsq
rep stosb
rep stosd
lodsb
scasb
repne scasb
repe cmpsb
cmpsq
stosq
hlt
cli
sti
cld
std
clc
stc
cmc
nop
pause
int3
int 0x80
int1
syscall
sysretq
sysenter
sysexitq
iretq
iret
ud2
ud1 eax, dword ptr [rsi]
ud0 eax, dword ptr [rsi]
cpuid
rdtsc
rdtscp
rdmsr
wrmsr
rdpmc
xgetbv
xsetbv
lfence
mfence
sfence
clflush byte ptr [rsi]
clflushopt byte ptr [rsi]
clwb byte ptr [rsi]
invlpg byte ptr [rax]
invpcid rax, xmmword ptr [rsi]
wbinvd
invd
lgdt [rsi]
sgdt [rsi]
lidt [rsi]
sidt [rsi]
lldt ax
ltr ax
str ax
sldt ax
mov cr3, rax
mov rax, cr3
mov cr0, rax
mov cr8, rax
mov rax, dr7
mov dr7, rax
mov ax, ds
mov ds, ax
mov fs, word ptr [rsi]
swapgs
rdfsbase rax
wrgsbase rax
xbegin .+0x100
xend
xabort 0x12
xtest
endbr64
rdrand eax
rdseed rax
movbe eax, dword ptr [rsi]
movbe dword ptr [rsi], eax
crc32 eax, byte ptr [rsi]
crc32 rax, qword ptr [rsi]
bswap eax
bswap r9
cwde
cdqe
cqo
cdq
cbw
sahf
lahf
xlatb
movnti dword ptr [rsi], eax
prefetcht0 byte ptr [rsi]
prefetchnta byte ptr [rip + 0x100]
prefetchw byte ptr [rsi]
nop dword ptr [rax]
nop word ptr [rax + rax + 0]
nop dword ptr [rax + rax + 0x11223344]
movups xmm0, xmmword ptr [rsi]
movups xmmword ptr [rsi], xmm1
movupd xmm0, xmmword ptr [rip + 0x100]
movupd xmmword ptr [rip + 0x100], xmm0
movaps xmmword ptr [rax], xmm2
movapd xmm8, xmmword ptr [rip + 0x100]
movss xmm0, dword ptr [rip + 0x100]
movss dword ptr [rip + 0x100], xmm0
movsd xmm0, qword ptr [rip + 0x100]
movsd qword ptr [rip + 0x100], xmm0
movd xmm0, dword ptr [rip + 0x100]
movd dword ptr [rip + 0x100], xmm0
movq xmm0, qword ptr [rip + 0x100]
movq qword ptr [rip + 0x100], xmm0
movq rax, xmm0
movq xmm1, rcx
movdqa xmm0, xmmword ptr [rip + 0x100]
movdqa xmmword ptr [rip + 0x100], xmm0
movdqu xmmword ptr [rsi], xmm3
movntdq xmmword ptr [rsi], xmm0
movntps xmmword ptr [rsi], xmm0
movlps qword ptr [rsi], xmm0
movhps qword ptr [rsi], xmm0
movhpd xmm0, qword ptr [rip + 0x100]
pshufd xmm0, xmmword ptr [rip + 0x100], 0x1b
pshufhw xmm0, xmmword ptr [rip + 0x100], 0x1b
pshufw mm0, qword ptr [rip + 0x100], 0x1b
psrldq xmm0, 4
pslld xmm1, 3
cmpps xmm0, xmmword ptr [rip + 0x100], 1
cmppd xmm0, xmmword ptr [rip + 0x100], 1
cmpss xmm0, dword ptr [rip + 0x100], 1
shufps xmm0, xmmword ptr [rip + 0x100], 1
shufpd xmm0, xmmword ptr [rip + 0x100], 1
pinsrw xmm0, word ptr [rip + 0x100], 1
pextrw eax, xmm0, 1
palignr xmm0, xmmword ptr [rip + 0x100], 4
pblendw xmm0, xmmword ptr [rip + 0x100], 4
roundss xmm0, dword ptr [rip + 0x100], 4
roundpd xmm0, xmmword ptr [rip + 0x100], 4
pextrd dword ptr [rip + 0x100], xmm0, 1
pextrb byte ptr [rsi], xmm0, 1
pextrq qword ptr [rsi], xmm0, 1
extractps dword ptr [rsi], xmm0, 1
pinsrd xmm0, dword ptr [rip + 0x100], 1
pinsrq xmm0, qword ptr [rip + 0x100], 1
insertps xmm0, dword ptr [rip + 0x100], 1
pcmpestri xmm0, xmmword ptr [rip + 0x100], 1
pshufb xmm0, xmmword ptr [rip + 0x100]
pmovzxbw xmm0, qword ptr [rip + 0x100]
ptest xmm0, xmmword ptr [rip + 0x100]
aesenc xmm0, xmmword ptr [rip + 0x100]
aeskeygenassist xmm0, xmmword ptr [rip + 0x100], 1
pclmulqdq xmm0, xmmword ptr [rip + 0x100], 1
sha1rnds4 xmm0, xmmword ptr [rip + 0x100], 1
addps xmm0, xmmword ptr [rip + 0x100]
addsd xmm0, qword ptr [rip + 0x100]
cvtsi2sd xmm0, dword ptr [rip + 0x100]
cvttsd2si rax, qword ptr [rip + 0x100]
ucomisd xmm0, qword ptr [rip + 0x100]
xorps xmm0, xmm0
pxor xmm0, xmmword ptr [rip + 0x100]
ldmxcsr dword ptr [rsi]
stmxcsr dword ptr [rsi]
fxsave [rsi]
fxrstor [rsi]
xsave [rsi]
xrstor [rsi]
xsaveopt [rsi]
emms
movq mm0, qword ptr [rsi]
movq qword ptr [rsi], mm0
paddb mm0, mm1
fld dword ptr [rsi]
fld qword ptr [rip + 0x100]
fld tbyte ptr [rsi]
fstp dword ptr [rsi]
fstp qword ptr [rip + 0x100]
fst qword ptr [rsi]
fild dword ptr [rsi]
fistp qword ptr [rsi]
fisttp dword ptr [rsi]
fnstcw word ptr [rsi]
fldcw word ptr [rsi]
fnstsw ax
fnstsw word ptr [rsi]
fadd st(0), st(1)
faddp st(1), st(0)
fmul dword ptr [rsi]
fcomip st(0), st(1)
fxch st(1)
fninit
fwait
vmovups ymm0, ymmword ptr [rsi]
vmovups ymmword ptr [rsi], ymm1
vmovupd xmm0, xmmword ptr [rip + 0x100]
vmovupd xmmword ptr [rip + 0x100], xmm0
vmovdqu ymmword ptr [rip + 0x100], ymm0
vmovd dword ptr [rip + 0x100], xmm0
vmovq qword ptr [rip + 0x100], xmm0
vmovq xmm0, qword ptr [rip + 0x100]
vmovss xmm0, dword ptr [rip + 0x100]
vmovss dword ptr [rip + 0x100], xmm0
vpshufd xmm0, xmmword ptr [rip + 0x100], 0x1b
vpshufd ymm0, ymmword ptr [rip + 0x100], 0x1b
vbroadcastss xmm0, dword ptr [rip + 0x100]
vpermpd ymm0, ymmword ptr [rip + 0x100], 1
vpermq ymm0, ymmword ptr [rip + 0x100], 1
vblendvps xmm0, xmm1, xmmword ptr [rip + 0x100], xmm3
vextractf128 xmmword ptr [rip + 0x100], ymm0, 1
vinsertf128 ymm0, ymm1, xmmword ptr [rip + 0x100], 1
vpextrd dword ptr [rsi], xmm0, 1
vcvtps2ph qword ptr [rsi], xmm0, 1
vaddps ymm0, ymm1, ymmword ptr [rip + 0x100]
vfmadd231ps ymm0, ymm1, ymmword ptr [rip + 0x100]
vpxor xmm8, xmm9, xmm10
vzeroupper
vzeroall
vmovdqu64 zmm0, zmmword ptr [rsi + 0x40]
vmovdqu64 zmmword ptr [rsi + 0x40], zmm1
vmovups zmm0, zmmword ptr [rip + 0x100]
vaddps zmm0, zmm1, dword ptr [rax + 4]{1to16}
{evex} vmovss xmm0, dword ptr [rip + 0x100]
vpshufd zmm0, zmmword ptr [rip + 0x100], 0x1b
vpternlogd zmm0, zmm1, zmmword ptr [rsi + 0x80], 0x96
kmovw k1, word ptr [rsi]
vpgatherdd xmm0, dword ptr [rax + xmm1*4], xmm2
andn eax, ebx, dword ptr [rsi]
bextr eax, dword ptr [rsi], ebx
shlx eax, dword ptr [rip + 0x100], ebx
rorx eax, dword ptr [rip + 0x100], 3
pdep rax, rbx, qword ptr [rsi]
adcx eax, dword ptr [rsi]
vmcall
vmmcall
vmlaunch
vmresume
vmxoff
vmptrld qword ptr [rsi]
vmread rax, rbx
vmwrite rax, qword ptr [rsi]
monitor
mwait
clac
stac
rsm
lar eax, ax
lsl eax, ax
verr ax
jmp .+0x2
jmp .+0x1000
call .+0x1000
je .+0x2
je .+0x1000
jne .-0x80
loop .+0x2
loope .+0x2
loopne .+0x2
jrcxz .+0x2
jecxz .+0x2
data16 nop
xchg ax, ax
xchg r8, rax
cs nop
fs mov eax, dword ptr [rsi]
gs mov qword ptr [rip + 0x100], rax
mov eax, dword ptr [eip + 0x100]
