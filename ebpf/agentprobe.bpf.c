/* agentprobe.bpf.c - the program BCC compiles: shared maps, then one file per
 * concern. The loader (agentprobe/loader.py) passes the knobs as -D flags. */
#include "common.bpf.h"
#include "exec.bpf.c"
#include "connect.bpf.c"
#include "gpu.bpf.c"
#include "proc.bpf.c"
#include "deny.bpf.c"
#include "sock.bpf.c"
#include "payload.bpf.c"
