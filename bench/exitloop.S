/* A guest that makes EXITS port-I/O exits from ring 3, then exits with 0.
 * `make bench` runs it under kvmlite's Python run loop and under a C loop
 * (bench/cref.c) on the same VM, to price one exit in Python against C.
 * Ring-0 set-up as in guest/entry.S: GDT with user segments, a TSS whose I/O
 * bitmap allows every port (kvm_pvm honours it, not IOPL), an IDT, IRETQ. */
#ifndef EXITS
#define EXITS 200000
#endif
.code64
.globl _start
_start:
  lgdt gdtr(%rip)
  # TSS descriptor at 0x28
  lea tss(%rip), %rax
  mov %rax, %rbx
  mov %ax, gdt+0x28+2(%rip)
  shr $16, %rax
  mov %al, gdt+0x28+4(%rip)
  mov %ah, gdt+0x28+7(%rip)
  shr $16, %rax
  mov %eax, gdt+0x28+8(%rip)
  lea kstack_top(%rip), %rax
  mov %rax, tss+4(%rip)
  mov $0x28, %ax
  ltr %ax
  # IDT entry 6 (#UD) and 13 (#GP), 14 (#PF)
  lea handler(%rip), %rax
  lea idt(%rip), %rdi
  mov $32, %ecx
1: mov %ax, (%rdi)
  movw $0x08, 2(%rdi)
  movw $0x8E00, 4(%rdi)
  mov %rax, %rdx
  shr $16, %rdx
  mov %dx, 6(%rdi)
  shr $16, %rdx
  mov %edx, 8(%rdi)
  add $16, %rdi
  dec %ecx
  jnz 1b
  lidt idtr(%rip)
  # iretq to ring 3
  pushq $0x1b        # SS user data 0x18|3
  lea ustack_top(%rip), %rax
  pushq %rax
  pushq $0x3002      # IOPL=3
  pushq $0x23        # CS user code 0x20|3
  lea user(%rip), %rax
  pushq %rax
  iretq
user:
  # ring 3: N port writes to an unclaimed port, then exit status 0
  mov $EXITS, %ecx
  mov $0x80, %dx
1: out %al, %dx
  dec %ecx
  jnz 1b
  mov $0x501, %dx
  xor %eax, %eax
  out %al, %dx
  ud2
handler:
  mov $0x3f8, %dx
  mov $'X', %al
  out %al, %dx
  mov (%rsp), %rax
  out %eax, %dx
  mov 8(%rsp), %rax
  out %eax, %dx
  hlt
.align 16
gdt:
  .quad 0
  .quad 0x00AF9A000000FFFF
  .quad 0x00CF92000000FFFF
  .quad 0x00CFF2000000FFFF
  .quad 0x00AFFA000000FFFF
  .quad 0x0000890000002068
  .quad 0
gdtr: .word 7*8-1
  .quad gdt
.align 16
idt: .fill 32*16,1,0
idtr: .word 32*16-1
  .quad idt
.align 16
tss: .fill 102,1,0
 .word 104
 .fill 8192,1,0
 .byte 0xff
.align 16
.fill 4096,1,0
kstack_top:
.fill 4096,1,0
ustack_top:
