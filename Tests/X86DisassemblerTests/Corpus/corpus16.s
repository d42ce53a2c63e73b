mov ax, 0x1234
mov eax, 0x11223344
mov word ptr [bx + si + 0x10], ax
mov ax, word ptr [bp + 0x1234]
mov ax, word ptr [0x1234]
mov eax, dword ptr [eax + 0x100]
mov eax, dword ptr [ebx + ecx*4 + 0x11223344]
mov al, byte ptr [0x1234]
mov al, byte ptr [0x11223344]
push 0x1234
push 0x12
call .+0x100
jmp .+0x100
je .+0x100
jcxz .+0x2
ljmp 0x10:0x1234
in al, dx
out dx, al
int 0x10
iret
