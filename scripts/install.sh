#!/usr/bin/env bash
# Install agentprobe and everything it needs on a Debian/Ubuntu machine, as root.
#
#   scripts/install.sh          runtime: BCC, kernel headers, tracefs, /opt/agentprobe/venv,
#                               /usr/local/bin/agentprobe
#   scripts/install.sh --test   the same, plus the tools the tests use (sshd, socat, ncat,
#                               nats-server, ...) and a test virtual environment in ./.venv
#
# Idempotent: running it again only fills in what is missing.
set -euo pipefail

WANT_TEST=0
[ "${1:-}" = "--test" ] && WANT_TEST=1

die() { echo "install.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
command -v apt-get >/dev/null || die "needs apt-get (Debian or Ubuntu)"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
KREL="$(uname -r)"
export DEBIAN_FRONTEND=noninteractive

DISTRO="$(. /etc/os-release && echo "$ID")"
pkgs=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools iproute2 util-linux gcc libc6-dev)
case "$DISTRO" in
    # Ubuntu ships bpftool in linux-tools-<kernel> behind the linux-tools-common wrapper
    ubuntu) pkgs+=(linux-tools-common) ;;
    *) pkgs+=(bpftool) ;;
esac
if [ "$WANT_TEST" = 1 ]; then
    pkgs+=(openssh-server openssh-client autossh socat ncat nats-server curl git make systemd
           ptunnel-ng dns2tcp iputils-ping  # covert-channel tests: real tunnel tools
           httptunnel proxytunnel corkscrew stunnel4 tinyproxy-bin dnsmasq-base  # tests/test_tunnel_tools.py
           nmap  # a real port scanner (connection-sweep test)
           openssl  # the test Kubernetes API server's certificate (tests/test_kubeapi.py)
           qemu-system-x86 mmdebstrap e2fsprogs  # scripts/vm-run, scripts/vm-test
           # the benign corpus (scripts/precision.py): CPython's own tests, the NL2Bash tasks' tools,
           # a C extension built from source
           libpython3.11-testsuite bind9-dnsutils python3-dev python3-setuptools)
fi

# package lists are needed to ask for kernel-specific packages on a fresh machine
[ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ] || apt-get update -qq
optional=()
# headers (and Ubuntu's bpftool) that match the running kernel when the distribution has them
if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    pkgs+=("linux-headers-$KREL")
else
    case "$DISTRO" in
        ubuntu) pkgs+=(linux-headers-generic) ;;
        *) pkgs+=(linux-headers-amd64) ;;
    esac
fi
if [ "$DISTRO" = ubuntu ]; then
    if apt-cache show "linux-tools-$KREL" >/dev/null 2>&1; then pkgs+=("linux-tools-$KREL"); else pkgs+=(linux-tools-generic); fi
fi
# `vagrant validate` in the tests; not every release carries vagrant any more
[ "$WANT_TEST" = 1 ] && optional+=(vagrant)

missing=()
for p in "${pkgs[@]}" "${optional[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    available=()
    for p in "${missing[@]}"; do
        if [[ " ${optional[*]} " == *" $p "* ]] && ! apt-cache show "$p" >/dev/null 2>&1; then
            echo "install.sh: $p is not packaged for $DISTRO; the tests that need it will say so" >&2
            continue
        fi
        available+=("$p")
    done
    [ "${#available[@]}" -eq 0 ] || apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null
fi
# some images ship without these even though the packages are installed
command -v sshd >/dev/null || [ "$WANT_TEST" = 0 ] || die "sshd missing after install"

# BCC compiles against /lib/modules/$KREL/{build,source}. A kernel without its own
# headers package (a cloud or Firecracker guest) gets the distribution's newest headers:
# tracepoint programs compile and load with them, and agentprobe takes every kernel
# struct offset from BTF, never from these headers.
if [ ! -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] && \
   [ ! -e "/lib/modules/$KREL/source/include/linux/kconfig.h" ]; then
    arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-generic /usr/src/linux-headers-*-cloud-amd64 \
        2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$arch_dir" ] || die "no kernel headers under /usr/src"
    common_dir="${arch_dir%-*}-common"
    [ -d "$common_dir" ] || common_dir="$arch_dir"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$arch_dir" "/lib/modules/$KREL/build"
    ln -sfn "$common_dir" "/lib/modules/$KREL/source"
    echo "install.sh: linked /lib/modules/$KREL/build -> $arch_dir, source -> $common_dir"
fi

mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug || true
mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing
[ -e /sys/kernel/btf/vmlinux ] || echo "install.sh: warning: this kernel has no BTF; agentprobe watch needs it" >&2

# the runtime: a venv that sees the distribution's BCC binding
VENV=/opt/agentprobe/venv
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$REPO"
ln -sfn "$VENV/bin/agentprobe" /usr/local/bin/agentprobe
"$VENV/bin/python" -c "import bcc, agentprobe" || die "the runtime venv cannot import bcc"
echo "install.sh: agentprobe installed: /usr/local/bin/agentprobe"

if [ "$WANT_TEST" = 1 ]; then
    TVENV="$REPO/.venv"
    [ -x "$TVENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$TVENV"
    "$TVENV/bin/python" -m pip install -q --disable-pip-version-check "$REPO[test]"
    echo "install.sh: test environment ready: $TVENV"
    # the benign corpus' third-party work, fetched now and never at bench or test time (which run
    # without a route out): the NL2Bash tasks of InterCode and a project built from its source
    PCACHE=/var/cache/agentprobe/precision
    mkdir -p "$PCACHE"
    for want in icalfa==0.3.6 simplejson==4.3.0; do
        ls "$PCACHE/${want%%==*}-${want##*==}"* >/dev/null 2>&1 || \
            "$TVENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
                $([ "${want%%==*}" = simplejson ] && echo --no-binary :all:) -d "$PCACHE" "$want"
    done
    echo "install.sh: benign corpus in $PCACHE"
fi
