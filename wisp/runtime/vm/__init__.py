"""The QEMU microvm runtime: guest boot assets (assets.py) and the driver built on them."""
