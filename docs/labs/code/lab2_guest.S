/*
 * Lab 2: a guest for the counter device of lab2_device.py.  It runs at CPL 0
 * straight from the VMM's long-mode entry (docs/boot.md), so every IN and OUT
 * is allowed and each one is a KVM_EXIT_IO for the VMM to answer.
 */
    .code64
    .set    DEBUGCON, 0xe9
    .set    EXIT, 0x501
    .set    COUNTER, 0x510      /* the new device (lab2_device.py) */
    .set    NOTHING, 0x300      /* a port no device claims */
    .globl  _start
_start:
    lea     hello(%rip), %rsi
    call    puts

    mov     $40, %eax           /* set the counter to 40 ... */
    mov     $COUNTER, %dx
    out     %eax, %dx
    lea     counter(%rip), %rsi
    call    puts
    mov     $3, %ebx
1:  mov     $COUNTER, %dx       /* ... and read it three times: 40 41 42 */
    in      %dx, %eax
    mov     %eax, %r12d
    call    putu
    dec     %ebx
    jnz     1b

    lea     nothing(%rip), %rsi
    call    puts
    mov     $NOTHING, %dx       /* nothing drives the bus: all ones */
    in      %dx, %al
    movzbl  %al, %eax
    call    putu

    lea     newline(%rip), %rsi
    call    puts
    xor     %eax, %eax          /* status 0 if the last read was 42, else 1 */
    cmp     $42, %r12d
    setne   %al
    mov     $EXIT, %dx
    out     %al, %dx            /* the exit device ends the run with this byte */
    hlt

/* puts: print the NUL-terminated string at %rsi on the debug console */
puts:
    mov     $DEBUGCON, %dx
2:  lodsb
    test    %al, %al
    jz      3f
    out     %al, %dx
    jmp     2b
3:  ret

/* putu: print %eax in decimal and a space (digits built backwards on the stack) */
putu:
    mov     %rsp, %rdi
    sub     $16, %rsp
    dec     %rdi
    movb    $' ', (%rdi)
    mov     $10, %ecx
4:  xor     %edx, %edx
    div     %ecx                /* %eax = quotient, %edx = the next digit */
    add     $'0', %dl
    dec     %rdi
    mov     %dl, (%rdi)
    test    %eax, %eax
    jnz     4b
    mov     %rdi, %rsi
    lea     16(%rsp), %rcx
    mov     $DEBUGCON, %dx
5:  cmp     %rcx, %rsi
    je      6f
    lodsb
    out     %al, %dx
    jmp     5b
6:  add     $16, %rsp
    ret

hello:   .asciz "lab2 guest: hello through the debug console\n"
counter: .asciz "counter reads: "
nothing: .asciz "\nunclaimed port reads: "
newline: .asciz "\n"
