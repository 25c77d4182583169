"""Print a TCP port on 127.0.0.1 that nothing listens on right now.

    python docs/labs/code/free_port.py > build/lab4/port

The kernel picks it (bind to port 0), so two people on one machine get
different ports; a fixed number like 4444 would collide.  The port is free
when this prints it; another program could take it before you use it, which
on a machine of your own does not happen in practice.
"""

from kvmlite.procs import free_port

print(free_port())
