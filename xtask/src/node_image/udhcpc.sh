#!/bin/sh
# udhcpc's event script in the Keelson node image: configure the interface from the lease.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
    fi
    : > /etc/resolv.conf
    for d in $dns; do
        echo "nameserver $d" >> /etc/resolv.conf
    done
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    echo "keelson-init: $interface has $ip/${mask:-24}" > /dev/console
    ;;
esac
exit 0
