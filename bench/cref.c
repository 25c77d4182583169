/* The C reference for `make bench`: the same KVM_RUN loop as kvmlite's
 * Machine.run(), minus Python.  kvmlite sets up the VM and passes the vCPU fd
 * and its mapped struct kvm_run; this loops until the guest writes the exit
 * port and returns how many exits it handled (or -exit_reason on anything else). */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define EXIT_PORT 0x501

long cref_run_loop(int vcpu_fd, struct kvm_run *run)
{
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            return -1000 - errno;
        }
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == EXIT_PORT)
                return exits;
            break;
        default:
            return -(long)run->exit_reason;
        }
    }
}
