"""Real Debian 12 servers for the guest-conversion tests: servers.py builds them from Debian
packages, boot.py boots them under QEMU as the physical machine or as a VM definition
describes."""
