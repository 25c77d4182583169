"""The monitor's side of kvmlite: what travels over the control socket, and
the client that speaks to it."""
