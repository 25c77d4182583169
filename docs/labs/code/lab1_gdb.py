"""Lab 1, step 7: the real gdb stops the guest inside its C code, through kvmlite's stub.

Starts `kvmlite run guest/guest.elf --gdb ...` on a free port (the VM waits for
gdb before its first instruction), runs gdb in batch mode with a few commands,
and prints the lines of gdb's output that the lab talks about: where it
stopped, the source lines it showed (tabs expanded) and the values it printed.
"""

import re
import subprocess
import sys

from kvmlite.procs import ChildProcess, free_port

port = free_port()
vm = ChildProcess([sys.executable, "-m", "kvmlite", "run", "guest/guest.elf", "--memory", "16M",
                   "--gdb", f"tcp:127.0.0.1:{port}", "--cmdline", "workload=hello"])
vm.wait_for("waiting for gdb", stream="stderr")
commands = ["break main", "continue", "next", "next", "print/x bi->magic",
            "print bi->ram_size >> 20", "print/x $cs", "continue"]
gdb = subprocess.run(["gdb", "-batch", "-nx", "guest/guest.elf", "-ex", f"target remote :{port}",
                      *(arg for c in commands for arg in ("-ex", c))],
                     capture_output=True, text=True, timeout=120)
stopped = False
for line in gdb.stdout.splitlines():
    if line.startswith("Breakpoint 1,"):
        stopped = True                   # source lines before this are gdb's connect banner
    if line.startswith(("Breakpoint 1,", "$", "[Inferior")) or (stopped and re.match(r"\d+\t", line)):
        print(line.expandtabs())
status = vm.wait(60)
print(f"the guest printed {vm.stdout_lines[0]!r} and exited with status {status}")
