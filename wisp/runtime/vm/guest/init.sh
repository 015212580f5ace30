#!/bin/busybox sh
# The VM sprite's first process (the initramfs's /init, run by the kernel as PID 1).
# Assembles the sprite's root as the container runtime does on the host - the base image
# read-only under the upper layer on the sprite's own disk - then hands PID 1 to busybox
# init, which starts the sprite (wisp-init in namespaces of its own, chrooted into that
# root) once and keeps the relay to the host running.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" || echo "wisp: insmod $m failed"; done < /lib/modules/order
for d in /sys/block/vd*; do
    [ -e "$d/serial" ] && ln -sf "/dev/${d##*/}" "/dev/disk-$(cat "$d/serial")"
done
host=sprite
agent_mac=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        wisp.hostname=*) host="${arg#wisp.hostname=}" ;;
        wisp.agent_mac=*) agent_mac="${arg#wisp.agent_mac=}" ;;
    esac
done
mkdir -p /tools /lower /disk /root
mount -o ro /dev/disk-python /tools
mount -o ro,noload /dev/disk-base /lower
mount -o noatime,discard /dev/disk-sprite /disk
mkdir -p /disk/upper /disk/work /disk/sprite/logs
mount -t overlay overlay -o lowerdir=/lower,upperdir=/disk/upper,workdir=/disk/work /root
mkdir -p /root/.wisp /root/.sprite /root/run/sprite/tasks
mount -t tmpfs -o size=4m,mode=0755 wisp /root/.wisp
cp /wisp/init /root/.wisp/init
mkdir -m 0700 /root/.wisp/run
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' "$host" > /root/.wisp/hosts
echo "$host" > /root/.wisp/hostname
[ -e /root/etc/hosts ] || touch /root/etc/hosts
mount --bind /root/.wisp/hosts /root/etc/hosts
mount -o remount,bind,ro /root/etc/hosts
# the sprite's resolver, written by the relay when the host says which (`N` frames); until
# then, and without an uplink, the image's own
cat /root/etc/resolv.conf > /root/.wisp/resolv.conf 2>/dev/null
[ -e /root/etc/resolv.conf ] || touch /root/etc/resolv.conf
mount --bind /root/.wisp/resolv.conf /root/etc/resolv.conf
mount -o remount,bind,ro /root/etc/resolv.conf
mount --bind /disk/sprite /root/.sprite
mount -o remount,bind,ro /root/.sprite
mount --bind /disk/sprite/logs /root/.sprite/logs
mount -t tmpfs -o size=64k,nr_inodes=512,mode=1777 tasks /root/run/sprite/tasks
ip link set lo up
for d in /sys/class/net/*; do  # the agent link (the sprite's own NIC: start.sh)
    [ "$(cat "$d/address")" = "$agent_mac" ] || continue
    ip link set "${d##*/}" up
    ip addr add 10.0.2.15/24 dev "${d##*/}"
done
mkdir -p /etc
cat > /etc/inittab <<EOF
::once:/bin/wisp-start
::respawn:/bin/wisp-relay
EOF
exec /bin/init
