"""Live migration: the wire format (wire.py) and the code that sends and receives VMs."""
