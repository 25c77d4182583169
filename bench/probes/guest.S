/*
 * bench/probes/guest.S - the probe guest: small tests of SMP, the LAPIC and
 * its timer, HLT, IPIs and dirty logging on this host's KVM.
 *
 * The probe VMM (probevm.py) builds the GDT, IDT, one TSS per CPU and the
 * page tables, and enters a test's label at CPL 0 in 64-bit mode with
 *     RDI = CPU index
 * Each CPU has a 64 KiB block at PB(cpu) = 0x200000 + cpu * 0x10000:
 *     +0x000  parameters, written by the VMM
 *     +0x100  results, read by the VMM
 *     +0x1000 samples (arrays of u64)
 * A test ends by writing a status to port 0xF0.  Ring-0 code is kept short:
 * on kvm_pvm every CPL-0 instruction goes through KVM's emulator.
 *
 * GDT (probevm.py): 0x08 kernel code64, 0x10 kernel data, 0x18 user data,
 * 0x20 user code64, 0x28 kernel code32 (the AP trampoline), 0x30+16i TSS i.
 */

#define PORT_DONE   0xF0
#define PORT_LOOP   0xF2
#define PORT_AP     0xF3
#define PORT_ROUND  0xF4
#define PORT_EXC    0xFE

#define UCODE       0x23
#define UDATA       0x1b
#define RF_USER_IF  0x3202      /* IOPL 3, IF = 1 */
#define RF_USER     0x3002      /* IOPL 3, IF = 0 */

#define MSR_APIC_BASE   0x1b
#define MSR_TSC_DEADLINE 0x6e0
#define MSR_STAR        0xc0000081
#define MSR_LSTAR       0xc0000082
#define MSR_FMASK       0xc0000084
#define MSR_GS_BASE     0xc0000101
#define MSR_TSC_AUX     0xc0000103
#define X2_EOI      0x80b
#define X2_SVR      0x80f
#define X2_ICR      0x830
#define X2_LVTT     0x832
#define X2_TMICT    0x838
#define X2_TDCR     0x83e
#define XA_ID       0x20
#define XA_EOI      0xb0
#define XA_SVR      0xf0
#define XA_ICR_LO   0x300
#define XA_ICR_HI   0x310

#define V_TIMER     0x40
#define V_IPI       0x41

/* r15 = cpu, r14 = its parameter block, rbp = xAPIC MMIO base */
.macro prologue
    mov     %rdi, %r15
    mov     %rdi, %r14
    shl     $16, %r14
    add     $0x200000, %r14
    mov     $0xfee00000, %ebp
.endm

/* rdx = TSC (64-bit); clobbers rax */
.macro tsc
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
.endm

.macro wrmsr_imm msr, lo, hi=0
    mov     $\msr, %ecx
    mov     $\lo, %eax
    mov     $\hi, %edx
    wrmsr
.endm

/* IRETQ to `label` at CPL 3 on this CPU's user stack (0x90000 + cpu * 0x10000). */
.macro to_user label, rflags
    pushq   $UDATA
    mov     %r15, %rax
    shl     $16, %rax
    add     $0x90000, %rax
    push    %rax
    pushq   $\rflags
    pushq   $UCODE
    lea     \label(%rip), %rax
    push    %rax
    iretq
.endm

.macro done
    xor     %eax, %eax
    out     %al, $PORT_DONE
1:  jmp     1b
.endm

/* x2APIC on (APIC_BASE.EXTD | EN), software-enabled with spurious vector 0xFF */
.macro x2apic_on
    mov     $MSR_APIC_BASE, %ecx
    rdmsr
    or      $0xc00, %eax
    wrmsr
    wrmsr_imm X2_SVR, 0x1ff
.endm

.macro xapic_on
    movl    $0x1ff, XA_SVR(%rbp)
.endm

    .text
    .code64

/* ---- 1. page writes at CPL 3: [0] pages to write, [8] pages in the region ---- */
    .globl t_pagewrite
t_pagewrite:
    prologue
    to_user pw_user, RF_USER
pw_user:
    mov     (%r14), %r12
    mov     8(%r14), %r13
    mov     %r15, %rbx
    shl     $24, %rbx
    add     $0x1000000, %rbx        /* 16 MiB + cpu * 16 MiB */
    tsc
    mov     %rdx, 0x100(%r14)
    xor     %r8, %r8
1:  mov     %r8, %rdi
    shl     $12, %rdi
    add     %rbx, %rdi
    mov     $512, %ecx
    mov     %r12, %rax
    rep stosq
    inc     %r8
    cmp     %r13, %r8
    jb      2f
    xor     %r8, %r8
2:  dec     %r12
    jnz     1b
    tsc
    mov     %rdx, 0x108(%r14)
    done

/* ---- 2. port-I/O exits from CPL 3: [0] count ---- */
    .globl t_outloop
t_outloop:
    prologue
    to_user ol_user, RF_USER
ol_user:
    mov     (%r14), %rcx
1:  out     %al, $PORT_LOOP
    dec     %rcx
    jnz     1b
    done

/* ---- 3. INIT-SIPI-SIPI from the BSP: [0] 1 = x2APIC, 0 = xAPIC MMIO; [8] target APIC ID ---- */
    .globl t_bsp_sipi
t_bsp_sipi:
    prologue
    cmpq    $1, (%r14)
    jne     1f
    x2apic_on
    tsc
    mov     %rdx, 0x100(%r14)
    mov     $X2_ICR, %ecx
    mov     8(%r14), %edx
    mov     $0x4500, %eax           /* INIT, level assert */
    wrmsr
    tsc
    mov     %rdx, 0x108(%r14)
    mov     $X2_ICR, %ecx
    mov     8(%r14), %edx
    mov     $0x4608, %eax           /* STARTUP, vector 8: the AP starts at 0x8000 */
    wrmsr
    mov     $0x4608, %eax
    wrmsr
    jmp     2f
1:  xapic_on
    tsc
    mov     %rdx, 0x100(%r14)
    mov     8(%r14), %eax
    shl     $24, %eax
    mov     %eax, XA_ICR_HI(%rbp)
    movl    $0x4500, XA_ICR_LO(%rbp)
    tsc
    mov     %rdx, 0x108(%r14)
    movl    $0x4608, XA_ICR_LO(%rbp)
    movl    $0x4608, XA_ICR_LO(%rbp)
2:  tsc
    mov     %rdx, 0x110(%r14)
    done

/* ---- 3b. a paravirtual CPU start: the BSP asks the VMM on PORT_START
 * (value = the CPU to start); the VMM sets that vCPU's registers to t_pv_ap
 * and lets its thread run.  [0x100] TSC at the request / at the AP's first
 * instruction. */
#define PORT_START 0xF7
    .globl t_pv_bsp
t_pv_bsp:
    prologue
    tsc
    mov     %rdx, 0x100(%r14)
    mov     $1, %eax
    out     %al, $PORT_START
    done

    .globl t_pv_ap
t_pv_ap:
    tsc
    prologue
    mov     %rdx, 0x100(%r14)
    done

/* ---- 4. LAPIC timer into CPL 3 ----
 * [0] mode: 0 one-shot (re-armed by the ISR, [8] = ns), 1 TSC deadline ([8] = cycles)
 * [0x10] interrupts to take, [0x18] gap threshold (cycles)
 * results: [0x100] interrupts, [0x108] sum of lateness (deadline mode), [0x110] max lateness,
 *          [0x118] sum of the gaps CPL 3 saw, [0x120] gaps, [0x128] max gap,
 *          [0x130] start, [0x138] end, [0x140] current deadline; samples: the first 4096 gaps,
 *          at +0x8000 the lateness of each interrupt (deadline mode) */
    .globl t_timer
t_timer:
    prologue
    x2apic_on
    wrmsr_imm X2_TDCR, 0xb          /* divide by 1 */
    cmpq    $1, (%r14)
    je      1f
    wrmsr_imm X2_LVTT, V_TIMER      /* one-shot */
    mov     $X2_TMICT, %ecx
    mov     8(%r14), %eax
    xor     %edx, %edx
    wrmsr
    jmp     2f
1:  wrmsr_imm X2_LVTT, (0x40000 | V_TIMER)  /* TSC-deadline mode */
    tsc
    add     8(%r14), %rdx
    mov     %rdx, 0x140(%r14)
    mov     %edx, %eax
    shr     $32, %rdx
    mov     $MSR_TSC_DEADLINE, %ecx
    wrmsr
2:  to_user timer_user, RF_USER_IF
timer_user:
    mov     0x10(%r14), %r12
    mov     0x18(%r14), %r13
    xor     %r8, %r8                /* gap sum */
    xor     %r9, %r9                /* gaps */
    xor     %r10, %r10              /* max gap */
    tsc
    mov     %rdx, 0x130(%r14)
    mov     %rdx, %rbx
1:  tsc
    mov     %rdx, %rsi
    sub     %rbx, %rsi
    mov     %rdx, %rbx
    cmp     %r13, %rsi
    jb      2f
    add     %rsi, %r8
    cmp     $4096, %r9
    jae     3f
    mov     %rsi, 0x1000(%r14, %r9, 8)  /* the first 4096 gaps, for a median */
3:  inc     %r9
    cmp     %r10, %rsi
    jb      2f
    mov     %rsi, %r10
2:  cmp     %r12, 0x100(%r14)
    jb      1b
    mov     %rbx, 0x138(%r14)
    mov     %r8, 0x118(%r14)
    mov     %r9, 0x120(%r14)
    mov     %r10, 0x128(%r14)
    done

/* The timer ISR (CPL 0).  r14 is the interrupted code's parameter block. */
    .globl isr_timer
isr_timer:
    push    %rax
    push    %rcx
    push    %rdx
    incq    0x100(%r14)
    mov     (%r14), %rax
    cmp     $1, %rax
    je      1f
    jb      2f
    jmp     3f                      /* mode 2 (sleep): nothing to re-arm */
1:  tsc                             /* deadline: lateness, then the next deadline */
    mov     %rdx, %rax
    sub     0x140(%r14), %rax
    add     %rax, 0x108(%r14)
    mov     0x100(%r14), %rcx
    and     $0xfff, %ecx
    mov     %rax, 0x8000(%r14, %rcx, 8)     /* lateness of interrupt i (mod 4096) */
    cmp     0x110(%r14), %rax
    jb      4f
    mov     %rax, 0x110(%r14)
4:  add     8(%r14), %rdx
    mov     %rdx, 0x140(%r14)
    mov     %edx, %eax
    shr     $32, %rdx
    mov     $MSR_TSC_DEADLINE, %ecx
    wrmsr
    jmp     3f
2:  mov     $X2_TMICT, %ecx         /* one-shot: arm again */
    mov     8(%r14), %eax
    xor     %edx, %edx
    wrmsr
3:  mov     $X2_EOI, %ecx
    xor     %eax, %eax
    xor     %edx, %edx
    wrmsr
    pop     %rdx
    pop     %rcx
    pop     %rax
    iretq

/* ---- 5. sleep: CPL 3 arms the timer with WRMSR and halts with HLT ----
 * Neither is allowed at CPL 3: each raises #GP and the #GP handler (isr_gp)
 * does it at CPL 0 and steps over it.  That trap is the guest's way into
 * ring 0 here: on kvm_pvm INT n (n != 3) at CPL 3 raises #UD and SYSCALL's
 * handler runs at CPL 3 (t_null shows both).
 * [0] = 2 (timer ISR mode: EOI only), [8] delta (TSC cycles, or ns if [0x18] = 1),
 * [0x10] iterations, [0x18] 0 = TSC deadline, 1 = one-shot.
 * samples: (t0, t1) per iteration at +0x1000 */
    .globl t_sleep
t_sleep:
    prologue
    x2apic_on
    wrmsr_imm X2_TDCR, 0xb
    cmpq    $1, 0x18(%r14)
    je      1f
    wrmsr_imm X2_LVTT, (0x40000 | V_TIMER)
    jmp     2f
1:  wrmsr_imm X2_LVTT, V_TIMER
2:  to_user sleep_user, RF_USER_IF
sleep_user:
    mov     0x10(%r14), %r12
    lea     0x1000(%r14), %rbx
1:  mov     0x100(%r14), %r9            /* timer interrupts so far: HLT's argument below */
    tsc
    mov     %rdx, (%rbx)
    cmpq    $1, 0x18(%r14)
    je      2f
    add     8(%r14), %rdx           /* TSC deadline = now + delta */
    mov     %edx, %eax
    shr     $32, %rdx
    mov     $MSR_TSC_DEADLINE, %ecx
    jmp     3f
2:  mov     8(%r14), %eax           /* one-shot: initial count = delta ns */
    xor     %edx, %edx
    mov     $X2_TMICT, %ecx
3:  wrmsr                           /* #GP: isr_gp writes the MSR */
    mov     %r9, %rax
    hlt                             /* #GP: isr_gp halts with interrupts on, unless the
                                       timer fired already (RAX = the count before) */
    tsc
    mov     %rdx, 8(%rbx)
    add     $16, %rbx
    dec     %r12
    jnz     1b
    done

/* #GP: emulate HLT and WRMSR for CPL 3; anything else is a real #GP. */
    .globl isr_gp
isr_gp:
    push    %rax
    mov     16(%rsp), %rax          /* RIP (after the saved RAX and the error code) */
    cmpb    $0xf4, (%rax)
    je      1f
    cmpw    $0x300f, (%rax)
    je      2f
    pop     %rax
    jmp     exc_13
1:  incq    16(%rsp)                /* HLT: return past it ... */
    pop     %rax
    add     $8, %rsp
    cmp     0x100(%r14), %rax       /* ... at once if the timer fired since CPL 3 looked */
    jne     3f
    sti                             /* ... else once an interrupt has come */
    hlt
    cli
3:  iretq
2:  addq    $2, 16(%rsp)            /* WRMSR with the caller's ECX, EDX:EAX */
    pop     %rax
    add     $8, %rsp
    wrmsr
    iretq

/* ---- 6. ways from CPL 3 into CPL 0: [0] iterations; [8] how:
 *   0 INT 0x81 (a DPL-3 gate), 1 SYSCALL (reports CS, SS, RFLAGS the handler sees on port 0xF6),
 *   2 INT3 (#BP, DPL-3 gate), 3 WRMSR of a harmless MSR (#GP, emulated by isr_gp),
 *   4 UD2 (#UD, the handler steps over it)
 * results [0x100] start, [0x108] end */
    .globl t_null
t_null:
    prologue
    x2apic_on
    mov     $MSR_STAR, %ecx         /* SYSCALL: CS 0x08, SS 0x10 */
    xor     %eax, %eax
    mov     $0x00100008, %edx
    wrmsr
    mov     $MSR_LSTAR, %ecx
    lea     syscall_entry(%rip), %rax
    mov     %rax, %rdx
    shr     $32, %rdx
    wrmsr
    wrmsr_imm MSR_FMASK, 0x200
    to_user null_user, RF_USER
null_user:
    mov     (%r14), %r12
    mov     8(%r14), %r13
    tsc
    mov     %rdx, 0x100(%r14)
1:  cmp     $1, %r13
    jb      10f
    je      11f
    cmp     $3, %r13
    jb      12f
    je      13f
    ud2
    jmp     2f
10: int     $0x81
    jmp     2f
11: syscall
    jmp     2f
12: int3
    jmp     2f
13: mov     $X2_TDCR, %ecx
    mov     $0xb, %eax
    xor     %edx, %edx
    wrmsr
2:  dec     %r12
    jnz     1b
    tsc
    mov     %rdx, 0x108(%r14)
    done

    .globl isr_null
isr_null:
    iretq

    .globl isr_ud
isr_ud:
    push    %rax
    mov     8(%rsp), %rax
    cmpw    $0x0b0f, (%rax)         /* UD2: step over it; any other #UD is reported */
    pop     %rax
    jne     exc_6
    addq    $2, (%rsp)
    iretq

/* Reports what the SYSCALL handler runs as, and returns with IRETQ: on
 * kvm_pvm it is CPL 3 (CS reads 0x33 as at any CPL 3, a privileged
 * instruction here raises #GP), so SYSCALL is no way into ring 0. */
    .globl syscall_entry
syscall_entry:
    mov     %cs, %eax
    out     %eax, $0xF6
    mov     %ss, %eax
    out     %eax, $0xF6
    pushf
    pop     %rax
    out     %eax, $0xF6
    mov     %rsp, %rax
    pushq   $UDATA
    push    %rax
    push    %r11
    pushq   $UCODE
    push    %rcx
    iretq

/* ---- 7. IPIs ----
 * receiver: [0] 1 = x2APIC, 0 = xAPIC; [8] IPIs to take.  It halts with
 *   interrupts on; the ISR stores the TSC at samples[count].
 * sender: [0] 0 = xAPIC MMIO from CPL 3, 1 = x2APIC ICR by a WRMSR that isr_gp does;
 *   [8] IPIs; [0x10] cycles between them; [0x18] destination APIC ID;
 *   [0x20] the receiver's parameter block (its [0x108] says it is ready; the
 *   sender waits for IPI i to arrive before it sends i+1: a second IPI of the
 *   same vector still pending in the IRR would merge with the first).
 *   samples[i] = TSC just before IPI i, at +0x8000 the cycles send i took;
 *   [0x100] their sum. */
    .globl t_ipi_recv
t_ipi_recv:
    prologue
    cmpq    $1, (%r14)
    jne     1f
    x2apic_on
    jmp     2f
1:  xapic_on
2:  movq    $1, 0x108(%r14)         /* ready: the sender waits for this */
    mov     8(%r14), %r12
3:  sti
    hlt
    cli
    cmp     %r12, 0x100(%r14)
    jb      3b
    done

    .globl isr_ipi
isr_ipi:
    push    %rax
    push    %rcx
    push    %rdx
    tsc
    mov     0x100(%r14), %rax
    mov     %rdx, 0x1000(%r14, %rax, 8)
    incq    0x100(%r14)
    cmpq    $1, (%r14)
    jne     1f
    mov     $X2_EOI, %ecx
    xor     %eax, %eax
    xor     %edx, %edx
    wrmsr
    jmp     2f
1:  movl    $0, XA_EOI(%rbp)
2:  pop     %rdx
    pop     %rcx
    pop     %rax
    iretq

    .globl t_ipi_send
t_ipi_send:
    prologue
    cmpq    $1, (%r14)
    jne     1f
    x2apic_on
    jmp     2f
1:  xapic_on
2:  to_user ipi_user, RF_USER
ipi_user:
    mov     0x20(%r14), %r11        /* the receiver's block: wait until it is ready */
4:  cmpq    $0, 0x108(%r11)
    je      4b
    mov     8(%r14), %r12
    lea     0x1000(%r14), %rbx
    xor     %r9, %r9                /* send cycles */
    xor     %r10, %r10              /* IPIs sent */
    tsc
    mov     %rdx, %r13              /* next send time */
1:  cmp     %r10, 0x100(%r11)       /* the last one arrived (same-vector IPIs would merge) */
    jb      1b
    tsc
    cmp     %r13, %rdx
    jb      1b
    mov     %rdx, (%rbx)
    mov     %rdx, %r8
    cmpq    $1, (%r14)
    je      2f
    mov     0x18(%r14), %eax
    shl     $24, %eax
    mov     %eax, XA_ICR_HI(%rbp)   /* xAPIC registers, mapped user-accessible */
    movl    $V_IPI, XA_ICR_LO(%rbp)
    jmp     3f
2:  mov     0x18(%r14), %edx        /* x2APIC: WRMSR to the ICR, trapped by isr_gp */
    mov     $V_IPI, %eax
    mov     $X2_ICR, %ecx
    wrmsr
3:  tsc
    sub     %r8, %rdx
    add     %rdx, %r9
    mov     %rdx, 0x8000(%r14, %r10, 8)     /* what this send cost */
    mov     %r8, %r13
    add     0x10(%r14), %r13
    add     $8, %rbx
    inc     %r10
    dec     %r12
    jnz     1b
    mov     %r9, 0x100(%r14)
    done

/* ---- 8. dirtying pages for the dirty log: [0] pages, [8] rounds ----
 * Each round writes one word into each page from 16 MiB on, then OUT PORT_ROUND
 * (the VMM harvests).  [0x100] sum of the cycles spent writing. */
    .globl t_dirty
t_dirty:
    prologue
    to_user dirty_user, RF_USER
dirty_user:
    mov     8(%r14), %r12
    xor     %r9, %r9
1:  tsc
    mov     %rdx, %r8
    mov     (%r14), %rcx
    mov     $0x1000000, %rdi
2:  mov     %r12, (%rdi)
    add     $4096, %rdi
    dec     %rcx
    jnz     2b
    tsc
    sub     %r8, %rdx
    add     %rdx, %r9
    mov     %r9, 0x100(%r14)
    out     %al, $PORT_ROUND
    dec     %r12
    jnz     1b
    done

/* ---- 9. who am I at CPL 3: GS base, CPUID ----
 * results: [0x100] %gs:0x20 at CPL 3 (GS base = this block, set at CPL 0),
 *          [0x110] CPUID.1 EBX at CPL 3, [0x118] CPUID 0x40000000 EBX at CPL 3,
 *          [0x120] CPUID.1 EBX at CPL 0 */
    .globl t_ident
t_ident:
    prologue
    mov     $1, %eax
    cpuid
    mov     %rbx, 0x120(%r14)
    mov     $MSR_GS_BASE, %ecx
    mov     %r14, %rax
    mov     %r14, %rdx
    shr     $32, %rdx
    wrmsr
    to_user ident_user, RF_USER
ident_user:
    mov     %gs:0x20, %rax
    mov     %rax, 0x100(%r14)
    mov     $1, %eax
    cpuid
    mov     %rbx, 0x110(%r14)
    mov     $0x40000000, %eax
    cpuid
    mov     %rbx, 0x118(%r14)
    done

/* ---- exceptions: report the vector on PORT_EXC and stop ---- */
.macro exc vec
    .globl exc_\vec
exc_\vec:
    mov     $\vec, %eax
    out     %al, $PORT_EXC
    jmp     .
.endm
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    exc \v
    .endr

    .globl isr_spurious
isr_spurious:
    iretq

/* ---- the AP's first instructions, in real mode at 0x8000 (SIPI vector 8) ----
 * It stores the TSC at 0x9000 (real mode) and 0x9008 (long mode), says which
 * APIC ID it has on PORT_AP, and ends.  The VMM leaves a GDTR at 0x9020. */
    .section .tramp, "ax"
    .code16
    .globl ap_rm
ap_rm:
    cli
    rdtsc
    xor     %bx, %bx
    mov     %bx, %ds
    mov     %eax, 0x9000
    mov     %edx, 0x9004
    lgdtl   0x9020
    mov     %cr0, %eax
    or      $1, %eax
    mov     %eax, %cr0
    ljmpl   $0x28, $ap_pm
    .code32
ap_pm:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %cr4, %eax
    or      $0x20, %eax             /* PAE */
    mov     %eax, %cr4
    mov     $0x10000, %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or      $0x100, %eax
    wrmsr
    mov     %cr0, %eax
    or      $0x80000000, %eax       /* PG: long mode is active */
    mov     %eax, %cr0
    ljmp    $0x08, $ap_lm
    .code64
ap_lm:
    rdtsc
    mov     %eax, 0x9008
    mov     %edx, 0x900c
    mov     $0xfee00000, %ebp
    mov     XA_ID(%rbp), %eax
    shr     $24, %eax
    out     %al, $PORT_AP
    xor     %eax, %eax
    out     %al, $PORT_DONE
    jmp     .
