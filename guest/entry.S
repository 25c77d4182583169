/*
 * entry.S - the only code of the guest that runs at CPL 0 on purpose.
 *
 * Why so little: on kvm_pvm (this project's reference host) guest code at
 * CPL 0 is executed by KVM's instruction emulator, ~1.3 us per instruction,
 * while CPL 3 code runs natively.  So the ring-0 entry only
 *
 *   1. loads a GDT that has user segments and a 64-bit TSS descriptor per CPU,
 *   2. loads the task register (the TSS supplies RSP0 for exceptions and the
 *      I/O permission bitmap that lets CPL 3 use port I/O),
 *   3. builds and loads an IDT: 32 exception gates, the LAPIC's vectors,
 *   4. points GS at the CPU's struct percpu (percpu.h),
 *   5. IRETQs to CPL 3,
 *
 * about 400 instructions in all.  Everything else, even zeroing .bss, runs
 * at CPL 3 (user_entry below, then main.c).  Ring 3 comes back to ring 0
 * only through exceptions and interrupts: #GP on HLT, RDMSR and WRMSR, which
 * gp_entry does for it (INT n and SYSCALL are no way in on kvm_pvm:
 * docs/boot.md), and the LAPIC timer and IPI, which only need an EOI.
 *
 * Ways in:
 *   kvmlite_entry  (offset 0 jumps there) - 64-bit mode, paging on, CPL 0,
 *                  RDI = boot-info block, RSI = 0x4b564d4c (docs/boot.md)
 *   mb_entry       - Multiboot v1 (e.g. qemu -kernel guest.bin): 32-bit
 *                  protected mode, paging off.  It builds identity page
 *                  tables, enters long mode, synthesizes a boot-info block
 *                  and joins kvmlite_entry.
 *   ap_entry       - another CPU, started by the CPU-start device: 64-bit,
 *                  CPL 0, RDI = its struct percpu, RSP = its ring-0 stack.
 *   ap_trampoline  - another CPU, started by INIT-SIPI-SIPI: real mode at
 *                  0x8000, where smp.c copied this code.  It gets to long
 *                  mode and joins ap_entry.
 */

#include "percpu.h"

#define KCODE       0x08    /* 64-bit code, DPL 0 */
#define KDATA       0x10    /* data, DPL 0 */
#define UDATA       0x18    /* data, DPL 3 */
#define UCODE       0x20    /* 64-bit code, DPL 3 */
#define KCODE32     0x28    /* 32-bit code, DPL 0: the AP trampoline's protected mode */
#define TSS_SEL     TSS_SEL0 /* CPU 0's 64-bit TSS; CPU i's at TSS_SEL0 + 16 * i */
#define RPL3        3

#define MSR_GS_BASE     0xc0000101
#define MSR_EFER        0xc0000080
#define X2APIC_EOI      0x80b
#define TRAMPOLINE      0x8000  /* an AP's SIPI vector 8 starts it here */

#define TSS_IOMAP_BASE  104             /* I/O bitmap right after the 104-byte TSS */
#define TSS_LIMIT       (TSS_IOMAP_BASE + 8192) /* 8 KiB bitmap + the 0xFF byte: last byte index */
#define IDT_VECTORS     32
#define ISR_STUB_SIZE   16

/* RFLAGS for ring 3: bit 1 (reserved, must be 1) | IOPL = 3; IF = 0 (no interrupts). */
#define USER_RFLAGS     0x3002

#define MB_MAGIC        0x1BADB002      /* in the header */
#define MB_BOOT_MAGIC   0x2BADB002      /* in EAX from the loader; passed on in RSI */
#define MB_FLAGS        0x00010002      /* bit 1: want mem_*; bit 16: address fields valid */

/* IDT gate `vec` (interrupt gate, DPL 0) to `handler`: the split of the
   address into bits 15:0, 31:16 and 63:32 as in the loop of kvmlite_entry. */
.macro set_gate vec, handler
    lea     \handler(%rip), %rax
    lea     idt + 16 * \vec(%rip), %rdx
    mov     %ax, (%rdx)
    movl    $(0x8E000000 | KCODE), 2(%rdx)
    shr     $16, %rax
    mov     %rax, 6(%rdx)
.endm

/* ====================================================================== */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    /* Offset 0 of guest.bin is the kvmlite entry point. */
    jmp     kvmlite_entry

    /*
     * Multiboot v1 header: must be 4-byte aligned within the first 8 KiB.
     * With flag bit 16 the loader takes the addresses below instead of
     * parsing an executable format, which is what a flat binary needs.
     */
    .org    0x10
mb_header:
    .long   MB_MAGIC
    .long   MB_FLAGS
    .long   -(MB_MAGIC + MB_FLAGS)      /* checksum: the three fields sum to 0 */
    .long   mb_header                   /* header_addr: where this header is loaded */
    .long   __image_start               /* load_addr: file offset 0 goes here */
    .long   __load_end                  /* load_end_addr: end of .data */
    .long   __image_end                 /* bss_end_addr: loader zeroes up to here */
    .long   mb_entry                    /* entry_addr (32-bit) */
    .org    0x40

/* ---------------------------------------------------------------------- */
/* 64-bit entry, CPL 0.  RDI and RSI are passed through untouched to user_entry. */
kvmlite_entry:
    lgdt    gdt_ptr(%rip)

    /*
     * Put the TSS's address into its descriptor.  The address is a link-time
     * constant, but the descriptor scatters it over four fields, which the
     * assembler cannot compute from a relocatable symbol; five stores here.
     */
    lea     tss(%rip), %rax
    mov     %ax, gdt_tss+2(%rip)        /* base 15:0 */
    shr     $16, %rax
    mov     %al, gdt_tss+4(%rip)        /* base 23:16 */
    mov     %ah, gdt_tss+7(%rip)        /* base 31:24 */
    shr     $16, %rax
    mov     %eax, gdt_tss+8(%rip)       /* base 63:32 */
    mov     $TSS_SEL, %ax
    ltr     %ax                         /* marks the descriptor busy */

    /*
     * IDT: 32 interrupt gates (type 0xE, present, DPL 0) to stub i at
     * isr_stubs + 16*i.  A gate splits the handler address into bits
     * 15:0 (bytes 0-1), 31:16 (bytes 6-7) and 63:32 (bytes 8-11); one
     * 8-byte store of address>>16 at byte 6 fills the last two (and
     * zeroes bytes 12-13, which are reserved).
     */
    lea     isr_stubs(%rip), %rax
    lea     idt(%rip), %rdx
    mov     $IDT_VECTORS, %ecx
1:  mov     %ax, (%rdx)                 /* offset 15:0 */
    movl    $(0x8E000000 | KCODE), 2(%rdx)  /* selector, IST 0, type/attributes 0x8E */
    mov     %rax, %r8
    shr     $16, %r8
    mov     %r8, 6(%rdx)                /* offset 63:16 */
    add     $16, %rdx
    add     $ISR_STUB_SIZE, %rax
    dec     %ecx
    jnz     1b
    set_gate 13, gp_entry               /* #GP: HLT, RDMSR, WRMSR from CPL 3 */
    set_gate VEC_TIMER, isr_lapic
    set_gate VEC_IPI, isr_lapic
    set_gate VEC_SPURIOUS, isr_spurious
    lidt    idt_ptr(%rip)

    /*
     * What only CPL 0 sees truly: CPUID (at CPL 3 kvm_pvm runs it on the host
     * CPU, so it tells the host's features and APIC ID) and CR3 (the page
     * tables the other CPUs will use).  RDI and RSI survive CPUID.
     */
    mov     $1, %eax
    cpuid
    mov     %ecx, g_cpuid1_ecx(%rip)
    mov     %edx, g_cpuid1_edx(%rip)
    mov     %cr3, %rax
    mov     %rax, g_boot_cr3(%rip)
    /* GS base = CPU 0's struct percpu (its fields are set at CPL 3). */
    lea     g_percpu(%rip), %rax
    mov     %rax, %rdx
    shr     $32, %rdx
    mov     $MSR_GS_BASE, %ecx
    wrmsr

    /*
     * Drop to CPL 3: IRETQ pops RIP, CS, RFLAGS, RSP, SS.  IOPL = 3 in
     * RFLAGS is what grants port I/O on most hypervisors; kvm_pvm ignores
     * it but honours the TSS I/O bitmap, so the guest has both.
     */
    pushq   $(UDATA | RPL3)             /* SS */
    lea     user_stack_top(%rip), %rax
    push    %rax                        /* RSP */
    pushq   $USER_RFLAGS                /* RFLAGS */
    pushq   $(UCODE | RPL3)             /* CS */
    lea     user_entry(%rip), %rax
    push    %rax                        /* RIP */
    iretq

/* ---------------------------------------------------------------------- */
/* CPL 3 from here on: native speed on kvm_pvm. */
user_entry:
    mov     %rdi, %r12                  /* boot info */
    mov     %rsi, %r13                  /* boot magic */
    /* Zero .bss (the stacks are in it too, but nothing is on them yet). */
    lea     __bss_start(%rip), %rdi
    lea     __bss_end(%rip), %rcx
    sub     %rdi, %rcx
    xor     %eax, %eax
    cld
    rep stosb
    lea     g_percpu(%rip), %rax        /* %gs:0 = CPU 0's struct percpu (percpu.h) */
    mov     %rax, PC_SELF(%rax)
    mov     %r12, %rdi
    mov     %r13, %rsi
    call    guest_main                  /* does not return */
    ud2

/* ---------------------------------------------------------------------- */
/*
 * Another CPU, CPL 0, 64-bit, the boot CPU's page tables; RDI = its struct
 * percpu, RSP = its ring-0 stack.  The CPU-start device enters here directly;
 * the INIT-SIPI trampoline comes through ap_sipi64.  About 20 instructions.
 */
    .globl  ap_entry
ap_entry:
    lgdt    gdt_ptr(%rip)               /* selectors 0x08 and 0x10 mean the same in the VMM's GDT */
    mov     PC_TSS_SEL(%rdi), %rax
    ltr     %ax                         /* its own TSS: RSP0 and the I/O bitmap (smp.c filled both) */
    lidt    idt_ptr(%rip)
    mov     %rdi, %rax
    mov     %rdi, %rdx
    shr     $32, %rdx
    mov     $MSR_GS_BASE, %ecx
    wrmsr
    pushq   $(UDATA | RPL3)             /* SS */
    pushq   PC_USTACK(%rdi)             /* RSP */
    pushq   $USER_RFLAGS                /* RFLAGS */
    pushq   $(UCODE | RPL3)             /* CS */
    lea     ap_user_entry(%rip), %rax
    push    %rax                        /* RIP */
    iretq

ap_user_entry:                          /* CPL 3, RDI = its struct percpu */
    call    ap_main                     /* does not return */
    ud2

/*
 * The trampoline ends here, in 64-bit mode on its own page tables (the low
 * 1 GiB) without a stack.  CPUID at CPL 0 gives its initial APIC ID, which is
 * its CPU index (vCPU i has APIC ID i under kvmlite; QEMU numbers them so too).
 */
    .globl  ap_sipi64
ap_sipi64:
    mov     $1, %eax
    cpuid
    shr     $24, %ebx
    imul    $PC_SIZE, %rbx, %rbx
    lea     g_percpu(%rip), %rdi
    add     %rbx, %rdi
    mov     PC_CR3(%rdi), %rax
    mov     %rax, %cr3                  /* the boot CPU's page tables: all of RAM */
    mov     PC_KSTACK(%rdi), %rsp
    jmp     ap_entry

/* ---------------------------------------------------------------------- */
/*
 * #GP.  From CPL 3 on HLT, RDMSR or WRMSR (of the LAPIC's MSRs), it does the
 * instruction here and returns past it: how the guest's ring 3 halts and
 * drives its LAPIC.  Anything else is a real #GP for trap_handler.
 * Frame: error code, RIP, CS, RFLAGS, RSP, SS.
 */
gp_entry:
    testb   $3, 16(%rsp)                /* CS's RPL: from CPL 3? */
    jz      gp_real
    push    %rax                        /* now: RAX, error, RIP (24 below: CS) */
    mov     16(%rsp), %rax
    cmpb    $0xf4, (%rax)
    je      gp_hlt
    cmpw    $0x300f, (%rax)             /* 0F 30 */
    je      gp_wrmsr
    cmpw    $0x320f, (%rax)             /* 0F 32 */
    jne     gp_real_pop
    call    msr_allowed
    jne     gp_real_pop
    addq    $2, 16(%rsp)
    pop     %rax
    add     $8, %rsp
    rdmsr
    iretq
gp_wrmsr:
    call    msr_allowed
    jne     gp_real_pop
    addq    $2, 16(%rsp)
    pop     %rax
    add     $8, %rsp
    wrmsr
    iretq
gp_hlt:
    incq    16(%rsp)                    /* HLT is one byte */
    pop     %rax
    add     $8, %rsp
    /*
     * RAX = the CPU's interrupt count ring 3 saw before it decided to halt.
     * An interrupt that came since (between its check and this trap, where
     * interrupts were on) would be lost: the CPU would halt for good.  So
     * halt only if the count is unchanged; interrupts are off here until
     * STI, whose shadow keeps them off until HLT has begun.
     */
    cmp     %gs:PC_IRQS, %rax
    jne     1f
    sti
    hlt                                 /* until an interrupt (its handler runs first) */
    cli
1:  iretq                               /* RFLAGS of CPL 3: interrupts as they were */
gp_real_pop:
    pop     %rax
gp_real:
    pushq   $13
    jmp     isr_common

/* ZF = 1 if ECX is an MSR ring 3 may have: IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC 0x800-0x8ff.
   Clobbers RAX (saved by gp_entry). */
msr_allowed:
    cmp     $0x1b, %ecx
    je      1f
    cmp     $0x6e0, %ecx
    je      1f
    mov     %ecx, %eax
    shr     $8, %eax
    cmp     $8, %eax
1:  ret

/* The LAPIC timer and the wake-up IPI: count it, EOI, return (HLT, if that
   is where it came, is then over).  The count is the CPU's own, via GS. */
isr_lapic:
    push    %rax
    push    %rcx
    push    %rdx
    incq    %gs:PC_IRQS
    mov     $X2APIC_EOI, %ecx
    xor     %eax, %eax
    xor     %edx, %edx
    wrmsr
    pop     %rdx
    pop     %rcx
    pop     %rax
    iretq

isr_spurious:                           /* the LAPIC wants no EOI for it */
    iretq

/* ---------------------------------------------------------------------- */
/*
 * The INIT-SIPI trampoline.  smp.c copies [ap_trampoline, ap_trampoline_end)
 * to TRAMPOLINE (0x8000) and fills its last 16 bytes: a GDTR for the guest's
 * GDT, the 32-bit CR3 of page tables for the low 1 GiB (CR3 is loaded in
 * 32-bit mode, so the real ones may be out of reach), and ap_sipi64's
 * address.  The code runs at 0x8000 whatever its link address, so it names
 * its own bytes by their offset from ap_trampoline.  About 25 instructions.
 */
#define TOFF(label) ((label) - ap_trampoline)
    .code16
    .globl  ap_trampoline, ap_trampoline_end
    .balign 16
ap_trampoline:
    cli
    mov     %cs, %ax                    /* CS = 0x0800 after SIPI vector 8 */
    mov     %ax, %ds
    lgdtl   TOFF(tramp_gdtr)
    mov     %cr0, %eax
    or      $1, %eax                    /* PE */
    mov     %eax, %cr0
    ljmpl   $KCODE32, $(TRAMPOLINE + TOFF(tramp_pm))
    .code32
tramp_pm:
    mov     $KDATA, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %cr4, %eax
    or      $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT, as the boot CPU has */
    mov     %eax, %cr4
    mov     (TRAMPOLINE + TOFF(tramp_cr3)), %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $0x101, %eax                /* LME | SCE */
    wrmsr
    mov     %cr0, %eax
    or      $0x80010022, %eax           /* PG | WP | NE | MP: long mode is active */
    mov     %eax, %cr0
    ljmp    $KCODE, $(TRAMPOLINE + TOFF(tramp_lm))
    .code64
tramp_lm:
    mov     (TRAMPOLINE + TOFF(tramp_target)), %rax
    jmp     *%rax
    .balign 8
tramp_gdtr:
    .word   0                           /* limit, base: filled by smp.c */
    .long   0
    .word   0
tramp_cr3:
    .long   0
    .long   0
tramp_target:
    .quad   0
ap_trampoline_end:
    .globl  tramp_gdtr, tramp_cr3, tramp_target

/* ---------------------------------------------------------------------- */
/*
 * Exception stubs, one per vector, each 16 bytes apart so the IDT loop can
 * compute their addresses.  The CPU pushes an error code for vectors 8,
 * 10-14, 17, 21, 29 and 30; for the others the stub pushes a 0 so that
 * every frame has the same layout (struct trap_frame in trap.c).
 */
.macro isr_stub vec
    .balign ISR_STUB_SIZE
    .if !((\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30))
    pushq   $0
    .endif
    pushq   $\vec
    jmp     isr_common
.endm

    .balign ISR_STUB_SIZE
isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    isr_stub \v
    .endr

isr_common:
    /*
     * An exception from CPL 3 arrives on TSS.RSP0 (kstack).  The CPU aligned
     * RSP to 16 before pushing its 5-word frame; with the stub's 2 words and
     * the 15 registers below the total is 22 words, so RSP is 16-aligned at
     * the CALL, as the SysV ABI wants.
     */
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %rbp
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    cld
    mov     %rsp, %rdi                  /* struct trap_frame * */
    call    trap_handler                /* does not return */
2:  jmp     2b

/*
 * Called by trap_handler (CPL 0) to end the machine on purpose: with an IDT
 * of limit 0 no vector can be delivered, so UD2's #UD becomes #GP, then #DF,
 * then a triple fault - KVM_EXIT_SHUTDOWN for the VMM.
 */
    .globl  triple_fault_now
triple_fault_now:
    lidt    null_idt_ptr(%rip)
    ud2
    jmp     triple_fault_now

/* ---------------------------------------------------------------------- */
/*
 * Multiboot v1 entry: 32-bit protected mode, paging off, EAX = 0x2BADB002,
 * EBX = physical address of the multiboot information structure.
 * Not performance-critical (under QEMU ring 0 is not emulated per
 * instruction), so plain loops are fine.
 */
    .code32
mb_entry:
    cli
    cld
    /* RAM size in KiB: 1 MiB + mem_upper when the loader gave it (flags bit 0). */
    mov     $(64 << 10), %eax           /* fallback: 64 MiB */
    testl   $1, (%ebx)
    jz      1f
    mov     8(%ebx), %eax               /* mem_upper: KiB of memory above 1 MiB */
    add     $1024, %eax
1:  cmp     $(4 << 20), %eax            /* the tables below map at most 4 GiB */
    jbe     2f
    mov     $(4 << 20), %eax
2:  mov     %eax, mb_ram_kb

    /*
     * Identity page tables like kvmlite's: one 2 MiB page per 2 MiB of RAM,
     * each entry P | RW | U/S (| PS for the 2 MiB pages); memory beyond RAM
     * stays unmapped.  The tables live in .boot, which the loader zeroed.
     */
    add     $2047, %eax
    shr     $11, %eax                   /* number of 2 MiB pages */
    mov     %eax, %ecx
    mov     $mb_pd, %edi
    mov     $0x87, %edx                 /* P | RW | U/S | PS, address 0 */
3:  mov     %edx, (%edi)
    movl    $0, 4(%edi)
    add     $8, %edi
    add     $0x200000, %edx
    loop    3b
    mov     $(mb_pd + 7), %edx          /* PDPT[i] -> PD i, P | RW | U/S */
    xor     %ecx, %ecx
4:  mov     %edx, mb_pdpt(,%ecx,8)
    add     $4096, %edx
    inc     %ecx
    cmp     $4, %ecx
    jb      4b
    movl    $(mb_pdpt + 7), mb_pml4     /* PML4[0] -> PDPT */

    /*
     * Copy the command line (flags bit 2) out of the loader's memory, which
     * may sit right after the image where the free-page bitmap will go.
     */
    xor     %ecx, %ecx
    testl   $4, (%ebx)
    jz      6f
    mov     16(%ebx), %esi
5:  cmp     $4095, %ecx
    jae     6f
    movb    (%esi,%ecx), %al
    test    %al, %al
    jz      6f
    movb    %al, mb_cmdline(%ecx)
    inc     %ecx
    jmp     5b
6:  movb    $0, mb_cmdline(%ecx)
    mov     %ecx, mb_bootinfo + 0x18    /* cmdline_len */

    /* Long mode: GDT, CR4.PAE, CR3, EFER.LME, then CR0.PG activates it. */
    lgdt    gdt_ptr                     /* in 32-bit mode: limit + low 32 bits of base */
    mov     %cr4, %eax
    or      $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT, as kvmlite sets */
    mov     %eax, %cr4
    mov     $mb_pml4, %eax
    mov     %eax, %cr3
    mov     $0xC0000080, %ecx           /* IA32_EFER */
    rdmsr
    or      $0x101, %eax                /* LME | SCE */
    wrmsr
    mov     %cr0, %eax
    and     $~0x4, %eax                 /* EM off */
    or      $0x80010023, %eax           /* PG | WP | NE | MP | PE */
    mov     %eax, %cr0
    ljmp    $KCODE, $mb_long64          /* load a 64-bit CS: now in 64-bit mode */

    .code64
mb_long64:
    mov     $KDATA, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    mov     mb_ram_kb(%rip), %eax
    shl     $10, %rax
    mov     %rax, mb_bootinfo + 0x08(%rip)  /* ram_size */
    lea     kstack_top(%rip), %rsp
    lea     mb_bootinfo(%rip), %rdi
    mov     $MB_BOOT_MAGIC, %esi
    jmp     kvmlite_entry

/* ====================================================================== */
    .section .data
    .balign 16
gdt:
    .quad   0                           /* null */
    .quad   0x00AF9A000000FFFF          /* 0x08 kernel code: P, DPL 0, code, L = 1 */
    .quad   0x00CF92000000FFFF          /* 0x10 kernel data: P, DPL 0, writable */
    .quad   0x00CFF2000000FFFF          /* 0x18 user data:   P, DPL 3, writable */
    .quad   0x00AFFA000000FFFF          /* 0x20 user code:   P, DPL 3, code, L = 1 */
    .quad   0x00CF9A000000FFFF          /* 0x28 kernel code32: P, DPL 0, D = 1 (the AP trampoline) */
gdt_tss:                                /* 0x30 CPU 0's 64-bit TSS, type 9 (available), P, DPL 0 */
    .quad   0x0000890000000000 | TSS_LIMIT  /* base filled in by kvmlite_entry */
    .quad   0
    .fill   (MAX_CPUS - 1) * 16, 1, 0   /* the other CPUs' TSS descriptors: smp.c */
gdt_end:
    .globl  gdt, gdt_ptr

    .balign 8
    .word   0                           /* pad: limit at 2 mod 4 puts the base on a 4-byte boundary (SDM) */
gdt_ptr:
    .word   gdt_end - gdt - 1
    .quad   gdt

    .word   0
idt_ptr:
    .word   256 * 16 - 1
    .quad   idt

    .word   0
null_idt_ptr:                           /* limit 0: no vector fits */
    .word   0
    .quad   0

    .balign 16
idt:
    .fill   256 * 16, 1, 0              /* gates written by kvmlite_entry; the others not present */

    .balign 8
    .globl  g_boot_cr3, g_cpuid1_ecx, g_cpuid1_edx
g_boot_cr3:     .quad 0                 /* kvmlite_entry: the boot CPU's CR3 */
g_cpuid1_ecx:   .long 0                 /* kvmlite_entry: CPUID.1 at CPL 0 */
g_cpuid1_edx:   .long 0

/*
 * 64-bit TSS (SDM Vol. 3A, 8.7).  In long mode it holds no task state, only
 * stack pointers and the I/O permission bitmap.  An exception that raises
 * CPL from 3 to 0 loads RSP0.  Bitmap bit = 0 allows that port at CPL 3;
 * the CPU may read one byte past the bitmap, hence the trailing 0xFF.
 */
    .balign 16
    .globl  tss
tss:                                    /* CPU 0's; the others' are in smp.c */
    .long   0                           /* 0x00 reserved */
    .quad   kstack_top                  /* 0x04 RSP0 */
    .quad   0, 0                        /* 0x0c RSP1, RSP2 */
    .quad   0                           /* 0x1c reserved */
    .quad   0, 0, 0, 0, 0, 0, 0         /* 0x24 IST1-7 */
    .quad   0                           /* 0x5c reserved */
    .word   0                           /* 0x64 reserved */
    .word   TSS_IOMAP_BASE              /* 0x66 I/O map base */
    .fill   8192, 1, 0                  /* 0x68 ports 0-65535: all allowed */
    .byte   0xff
tss_end:
    .if tss_end - tss != TSS_LIMIT + 1
    .error "TSS size does not match its descriptor limit"
    .endif

/* Boot-info block for the Multiboot path (docs/boot.md layout). */
    .balign 8
mb_bootinfo:
    .long   0x4f464e49                  /* magic "INFO" */
    .word   1                           /* version */
    .word   0x50                        /* size */
    .quad   0                           /* ram_size: mb_long64 */
    .quad   mb_cmdline                  /* cmdline_gpa */
    .long   0                           /* cmdline_len: mb_entry */
    .long   0                           /* flags: no free-page-hint device */
    .word   0x3f8, 0xe9, 0x501, 0x520   /* uart, debugcon, exit, fph ports */
    .quad   0                           /* tsc_khz: unknown */
    .quad   __image_start
    .quad   __image_end
    .quad   0x100000                    /* reserved_end: BIOS area below 1 MiB */
    .quad   mb_pml4                     /* pagetable_gpa */
mb_ram_kb:
    .long   0

/* ====================================================================== */
    .section .bss
    .balign 4096
    .globl  kstack_top, user_stack_top
kstack:
    .skip   16384                       /* ring 0 of CPU 0: exceptions only */
kstack_top:
    .skip   65536                       /* ring 3 of CPU 0: everything else */
user_stack_top:

/*
 * Multiboot-only memory, kept out of .bss because user_entry zeroes .bss
 * while these page tables are in use.  The Multiboot loader zeroes it
 * (it lies below bss_end_addr).
 */
    .section .boot, "aw", @nobits
    .balign 4096
mb_pml4:    .skip 4096
mb_pdpt:    .skip 4096
mb_pd:      .skip 4 * 4096
mb_cmdline: .skip 4096
