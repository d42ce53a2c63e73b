mov eax, 0x11223344
mov ax, 0x1234
mov dword ptr [esi + 0x40], eax
mov word ptr [0x1000], ax
mov word ptr [0x1000], 0x1234
mov ax, word ptr [eax + 0x100]
mov eax, dword ptr [ebx + ecx*4 + 0x11223344]
mov eax, dword ptr [bx + si + 0x10]
mov eax, dword ptr [bp]
mov ax, word ptr [bx + 0x1234]
mov eax, dword ptr fs:[0x28]
mov eax, dword ptr es:[edi]
mov eax, dword ptr [0x11223344]
mov al, byte ptr [0x11223344]
mov al, byte ptr [0x1234]
push es
pop ds
pusha
popa
push 0x11223344
push 0x12
pushw 0x1234
inc eax
dec cx
les eax, [esi]
lds ax, [bx]
bound eax, qword ptr [esi]
daa
aam 10
aad 10
into
call .+0x1000
call .+0x10
jmp .+0x1000
je .+0x1000
jcxz .+0x2
jecxz .+0x2
ljmp 0x10:0x11223344
lcall 0x10:0x11223344
ljmp 0x10:0x1234
in al, dx
out dx, eax
rep outsb
movups xmm0, xmmword ptr [esi]
movupd xmmword ptr [0x1000], xmm0
vmovups ymm0, ymmword ptr [esi]
vpshufd xmm0, xmmword ptr [0x1000], 1
vmovups zmm0, zmmword ptr [esi + 0x40]
enter 0x10, 0
ret 4
