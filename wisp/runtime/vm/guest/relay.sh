#!/bin/sh
# The guest end of the agent channel, on the guest's Python (the read-only /tools disk).
export PYTHONHOME=/tools/usr PYTHONDONTWRITEBYTECODE=1 LD_LIBRARY_PATH=/tools/lib/x86_64-linux-gnu:/tools/usr/lib/x86_64-linux-gnu
exec /tools/usr/bin/python3.11 -I -S /wisp/relay.py /root/.wisp/run/agent.sock 7000
