/*
 * Lab 1: the smallest useful guest.  The VMM enters it in 64-bit long mode at
 * CPL 0 (docs/boot.md); it makes each kind of port-I/O exit once, then halts.
 * Port 0xE9 is the Bochs/QEMU debug console: a byte written is printed, and a
 * read returns 0xE9 when the console is there.
 */
    .code64
    .globl _start
_start:
    lea     msg(%rip), %rsi
    mov     $msg_end - msg, %ecx
    mov     $0xe9, %dx
    rep outsb               /* one string OUT: KVM_EXIT_IO with count = the length */
    in      %dx, %al        /* a read: the VMM puts the answer in the kvm_run page */
    cmp     $0xe9, %al
    mov     $'Y', %al
    je      1f
    mov     $'N', %al
1:  out     %al, %dx        /* a single OUT */
    mov     $'\n', %al
    out     %al, %dx
    hlt                     /* interrupts are off and no device can wake us: KVM_EXIT_HLT */

msg:
    .ascii  "ring 0 says hi; debugcon? "
msg_end:
