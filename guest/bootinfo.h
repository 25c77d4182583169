/*
 * bootinfo.h - the boot-info block the VMM passes in RDI (docs/boot.md,
 * "The boot-info block").  Version 1 is 0x50 bytes (0x58 with idle_port);
 * version 2 (0x68 bytes) appends where the VMM's boot area is and the CPU
 * count: it moved the boot area from low memory to the top of RAM, so a
 * guest keeps [boot_area_gpa, reserved_end) for itself.  Fields are only
 * ever appended, so a guest checks size >=, not ==.
 */
#ifndef GUEST_BOOTINFO_H
#define GUEST_BOOTINFO_H

#include "lib.h"

#define BOOT_INFO_MAGIC     0x4f464e49u     /* "INFO" */
#define BOOT_INFO_VERSION   2               /* the newest this guest knows */
#define BOOT_INFO_V1_SIZE   0x50
#define BOOT_INFO_IDLE_SIZE 0x58            /* the block with idle_port */
#define BOOT_INFO_V2_SIZE   0x68
#define BOOT_INFO_FLAG_FPH  (1u << 0)       /* the free-page-hint device exists */
#define BOOT_INFO_FLAG_LAPIC (1u << 1)      /* in-kernel LAPIC: timer, IPIs, INIT-SIPI; HLT waits */
#define BOOT_INFO_FLAG_CPUSTART (1u << 2)   /* the CPU-start device is at cpustart_port */
#define KVMLITE_RSI_MAGIC   0x4b564d4cu     /* "LMVK" in RSI at entry */
#define MULTIBOOT_BOOT_MAGIC 0x2badb002u    /* entry.S passes it in RSI after a Multiboot boot */

struct boot_info {
    u32 magic;
    u16 version;
    u16 size;
    u64 ram_size;
    u64 cmdline_gpa;
    u32 cmdline_len;
    u32 flags;
    u16 uart_port;
    u16 debugcon_port;
    u16 exit_port;
    u16 fph_port;
    u64 tsc_khz;
    u64 image_start;
    u64 image_end;
    u64 reserved_end;
    u64 pagetable_gpa;
    u16 idle_port;      /* 0x50: the idle device, 0 if none (read only if size >= 0x58) */
    u16 reserved[3];
    /* version 2 (read only if version >= 2 and size >= 0x68) */
    u64 boot_area_gpa;  /* 0x58: the VMM's boot area is [boot_area_gpa, reserved_end) */
    u32 cpu_count;      /* 0x60: vCPUs; vCPU i has APIC ID i, vCPU 0 is this one */
    u16 cpustart_port;  /* 0x64: the CPU-start device, 0 if none */
    u16 reserved2;
} __attribute__((packed));

_Static_assert(sizeof(struct boot_info) == BOOT_INFO_V2_SIZE, "boot-info layout");

/* Linker-script symbols (linker.ld): addresses, not variables. */
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];

#endif
