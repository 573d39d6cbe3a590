#!/bin/sh
# /init of the Keelson node image (busybox sh, PID 1): mount the kernel's file systems (cgroup2
# alone at /sys/fs/cgroup: a pure v2 node), load the node's kernel modules, bring the NIC up
# with DHCP, import the bundled busybox image, then run `keelson-agent boot`, which applies
# the NoCloud seed named on the kernel command line and becomes `keelson-agent node`.
# Staying PID 1 (the agent runs as a child) keeps orphaned processes reaped.
export PATH=/usr/bin:/bin
say() { echo "keelson-init: $*" > /dev/console; }

# Containers are started with pivot_root(2), which refuses to move the initramfs (rootfs):
# first copy the tree to a tmpfs and make that the root, as a disk's root would be.
if [ ! -e /.keelson-root ]; then
    mkdir -p /mnt/root
    mount -t tmpfs -o mode=0755 tmpfs /mnt/root
    for entry in /*; do
        [ "$entry" = /mnt ] || cp -a "$entry" /mnt/root/
    done
    mkdir -p /mnt/root/mnt
    : > /mnt/root/.keelson-root
    exec switch_root /mnt/root /init
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/lib/keelson /sys/fs/cgroup /sys/fs/bpf
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
# Image layers and container roots: overlayfs wants a real tmpfs, not the initramfs.
mount -t tmpfs -o mode=0755 tmpfs /var/lib/keelson
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control || say "cgroup controllers not enabled"

say "loading modules"
while read -r module; do
    insmod "$module" || say "insmod $module failed"
done < /etc/keelson/modules

ip link set lo up
nic=""
for i in $(seq 1 50); do
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] && continue
        [ -e "$dev/device" ] || continue
        nic=$name
        break 2
    done
    sleep 0.1
done
if [ -z "$nic" ]; then
    # Rebooting network-boots again, which is the way back for a diskless node.
    say "no network interface; rebooting in 10 s"
    sleep 10
    reboot -f
fi
say "DHCP on $nic"
# Returns once bound, then keeps renewing the lease in the background.
udhcpc -i "$nic" -s /etc/keelson/udhcpc.sh -T 2 -A 2

say "importing the bundled images"
for image in /usr/share/keelson/images/*; do
    [ -d "$image" ] || continue
    keelson-agent image import "$image" --state-dir /var/lib/keelson \
        || say "importing $image failed"
done

while true; do
    say "starting keelson-agent boot"
    keelson-agent boot
    say "keelson-agent exited ($?); restarting in 5 s"
    sleep 5
done
