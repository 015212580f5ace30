#!/bin/sh
# Starts the sprite (once, from busybox init) in a network namespace of its own inside the
# guest: the guest's NIC on the sprite's network (a tap in the sprite's namespace on the
# host) is moved into it and named eth0; the agent link's NIC stays outside, with the
# relay, so nothing in the sprite can reach the relay. The namespace is held by a process
# of the guest (/run/wisp-net.pid), which the relay enters to configure the sprite's
# address (`N` frames) and to dial into it (`C` frames).
AGENT_MAC=$(sed -n 's/.*wisp.agent_mac=\([^ ]*\).*/\1/p' /proc/cmdline)
unshare -n sleep 2147483647 &
holder=$!
while [ "$(readlink /proc/$holder/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do
    usleep 1000
done
for d in /sys/class/net/*; do
    dev=${d##*/}
    [ "$dev" = lo ] && continue
    [ "$(cat "$d/address")" = "$AGENT_MAC" ] && continue
    ip link set "$dev" netns "$holder"
    nsenter -t "$holder" -n ip link set "$dev" name eth0
done
nsenter -t "$holder" -n ip link set lo up
mkdir -p /run
echo "$holder" > /run/wisp-net.pid
exec nsenter -t "$holder" -n unshare -m -u -i -p -f /bin/wisp-sprite
