#!/bin/sh
# PID 1 of the sprite's own pid namespace (and mount, UTS, IPC ones): its kernel-facing
# mounts, then wisp-init chrooted into the sprite's root, as runc starts it on the host.
mount --make-rprivate /
mount -t proc proc /root/proc
mount --rbind /dev /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /root/dev/pts
mount --bind /root/dev/pts/ptmx /root/dev/ptmx
# the guest's RAM is the sprite's own: its shared memory may use most of it
mount -t tmpfs -o mode=1777,size=90% shm /root/dev/shm
mount -t sysfs sys /root/sys
hostname "$(cat /root/.wisp/hostname)"
exec chroot /root /.wisp/init
