/* agentprobe.bpf.c - the program BCC compiles: shared maps and helpers, then
 * one file per concern, each after those whose helpers it calls (the connect
 * hooks ask deny.bpf.c and remember owners through sock.bpf.c; the egress hook
 * samples packets through sock.bpf.c). Knobs: knobs.h, overridable with -D;
 * the loader (agentprobe/loader.py) passes its own as -D flags. */
#include "common.bpf.h"
#include "exec.bpf.c"
#include "gpu.bpf.c"
#include "proc.bpf.c"
#include "deny.bpf.c"
#include "sock.bpf.c"
#include "connect.bpf.c"
#include "payload.bpf.c"
