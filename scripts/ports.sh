# Sourced by pg.sh and s3.sh: free loopback ports for throwaway servers.
#
# free_ports N prints N distinct ports, one per line, each free on 127.0.0.1 when chosen
# and outside the kernel's ephemeral range (net.ipv4.ip_local_port_range). A port picked by
# binding to port 0 lies inside that range, where any outgoing connection made before the
# server binds it (by the server itself: `weed mini` connects its services to each other
# as they start) can take it; a port outside the range can only be taken by a program that
# binds it by number.
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys

count = int(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
except OSError:
    low, high = 32768, 60999
candidates = [p for p in range(10000, 65536) if not low <= p <= high]
random.shuffle(candidates)
chosen = []
for port in candidates:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    chosen.append(port)
    if len(chosen) == count:
        break
if len(chosen) < count:
    sys.exit("ports.sh: fewer than %d free ports on 127.0.0.1" % count)
print("\n".join(map(str, chosen)))
PY
}
