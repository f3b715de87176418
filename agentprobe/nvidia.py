"""NVIDIA driver ioctls, decoded to what they mean.

The kernel side reports, per GPU ioctl, the device kind, the driver's command
number and one detail word (see ebpf/agentprobe.h): on the frontend devices
(/dev/nvidiactl, /dev/nvidiaN, major 195) the number is `_IOC_NR` (the driver
ignores the rest; NV_ESC_IOCTL_XFER_CMD is already unwrapped), RM_ALLOC's
detail is the object class (`hClass`) and RM_CONTROL's the control command.
On /dev/nvidia-uvm the number is the raw ioctl request.

Names and numbers come from NVIDIA's open kernel modules
(kernel-open/common/inc/nv-ioctl-numbers.h, src/nvidia/arch/nvalloc/unix/include/nv_escape.h,
kernel-open/nvidia-uvm/uvm_ioctl.h, src/nvidia/generated/g_allclasses.h).

`meaning` is what a rule can speak of; one of MEANINGS or None. It is a coarse,
stable vocabulary: CUDA brings a context up with RM_ALLOC of a root client
(`context_create`, also done by NVML/nvidia-smi), then UVM_INITIALIZE (`uvm_init`),
device/subdevice objects (`device_open`), an address space, channels
(`channel_create`) and a compute engine object (`compute_engine`: only real
CUDA work allocates one). Kernel launches are invisible here: they go through a
doorbell in mapped memory, not an ioctl.
"""

from __future__ import annotations

NVIDIA_MAJOR = 195
MODESET_MINOR = 254
CTL_MINOR = 255
MAX_GPU_MINOR = 247

# meanings
CONTEXT_CREATE = "context_create"
DEVICE_OPEN = "device_open"
ADDRESS_SPACE_CREATE = "address_space_create"
CHANNEL_CREATE = "channel_create"
COMPUTE_ENGINE = "compute_engine"
COPY_ENGINE = "copy_engine"
GPU_MEMORY_ALLOC = "gpu_memory_alloc"
HOST_MEMORY_ALLOC = "host_memory_alloc"
GPU_MEMORY_MAP = "gpu_memory_map"
UVM_INIT = "uvm_init"
DRIVER_PROBE = "driver_probe"

MEANINGS = (CONTEXT_CREATE, DEVICE_OPEN, ADDRESS_SPACE_CREATE, CHANNEL_CREATE, COMPUTE_ENGINE, COPY_ENGINE,
            GPU_MEMORY_ALLOC, HOST_MEMORY_ALLOC, GPU_MEMORY_MAP, UVM_INIT, DRIVER_PROBE)

# frontend escapes (NV_IOCTL_BASE 200) and resource-manager commands, by _IOC_NR
FRONTEND = {
    200: "CARD_INFO",
    201: "REGISTER_FD",
    206: "ALLOC_OS_EVENT",
    207: "FREE_OS_EVENT",
    209: "STATUS_CODE",
    210: "CHECK_VERSION_STR",
    211: "IOCTL_XFER_CMD",
    212: "ATTACH_GPUS_TO_FD",
    213: "QUERY_DEVICE_INTR",
    214: "SYS_PARAMS",
    217: "EXPORT_TO_DMABUF_FD",
    218: "WAIT_OPEN_COMPLETE",
    0x27: "RM_ALLOC_MEMORY",
    0x28: "RM_ALLOC_OBJECT",
    0x29: "RM_FREE",
    0x2A: "RM_CONTROL",
    0x2B: "RM_ALLOC",
    0x34: "RM_DUP_OBJECT",
    0x35: "RM_SHARE",
    0x39: "RM_I2C_ACCESS",
    0x41: "RM_IDLE_CHANNELS",
    0x4A: "RM_VID_HEAP_CONTROL",
    0x4D: "RM_ACCESS_REGISTRY",
    0x4E: "RM_MAP_MEMORY",
    0x4F: "RM_UNMAP_MEMORY",
    0x52: "RM_GET_EVENT_DATA",
    0x54: "RM_ALLOC_CONTEXT_DMA2",
    0x56: "RM_ADD_VBLANK_CALLBACK",
    0x57: "RM_MAP_MEMORY_DMA",
    0x58: "RM_UNMAP_MEMORY_DMA",
    0x59: "RM_BIND_CONTEXT_DMA",
    0x5C: "RM_EXPORT_OBJECT_TO_FD",
    0x5D: "RM_IMPORT_OBJECT_FROM_FD",
    0x5E: "RM_UPDATE_DEVICE_MAPPING_INFO",
    0x5F: "RM_LOCKLESS_DIAGNOSTIC",
}
RM_ALLOC = 0x2B
RM_CONTROL = 0x2A

UVM = {
    0x30000001: "UVM_INITIALIZE",
    0x30000002: "UVM_DEINITIALIZE",
    1: "UVM_RESERVE_VA",
    2: "UVM_RELEASE_VA",
    3: "UVM_REGION_COMMIT",
    4: "UVM_REGION_DECOMMIT",
    5: "UVM_REGION_SET_STREAM",
    6: "UVM_SET_STREAM_RUNNING",
    7: "UVM_SET_STREAM_STOPPED",
    10: "UVM_ADD_SESSION",
    12: "UVM_ENABLE_COUNTERS",
    13: "UVM_MAP_COUNTER",
    14: "UVM_CREATE_EVENT_QUEUE",
    15: "UVM_REMOVE_EVENT_QUEUE",
    16: "UVM_MAP_EVENT_QUEUE",
    17: "UVM_EVENT_CTRL",
    20: "UVM_GET_GPU_UUID_TABLE",
    21: "UVM_REGION_SET_BACKING",
    22: "UVM_REGION_UNSET_BACKING",
    23: "UVM_CREATE_RANGE_GROUP",
    24: "UVM_DESTROY_RANGE_GROUP",
    25: "UVM_REGISTER_GPU_VASPACE",
    26: "UVM_UNREGISTER_GPU_VASPACE",
    27: "UVM_REGISTER_CHANNEL",
    28: "UVM_UNREGISTER_CHANNEL",
    29: "UVM_ENABLE_PEER_ACCESS",
    30: "UVM_DISABLE_PEER_ACCESS",
    31: "UVM_SET_RANGE_GROUP",
    33: "UVM_MAP_EXTERNAL_ALLOCATION",
    34: "UVM_FREE",
    35: "UVM_MEM_MAP",
    37: "UVM_REGISTER_GPU",
    38: "UVM_UNREGISTER_GPU",
    39: "UVM_PAGEABLE_MEM_ACCESS",
    40: "UVM_PREVENT_MIGRATION_RANGE_GROUPS",
    41: "UVM_ALLOW_MIGRATION_RANGE_GROUPS",
    42: "UVM_SET_PREFERRED_LOCATION",
    43: "UVM_UNSET_PREFERRED_LOCATION",
    44: "UVM_ENABLE_READ_DUPLICATION",
    45: "UVM_DISABLE_READ_DUPLICATION",
    46: "UVM_SET_ACCESSED_BY",
    47: "UVM_UNSET_ACCESSED_BY",
    51: "UVM_MIGRATE",
    53: "UVM_MIGRATE_RANGE_GROUP",
    56: "UVM_TOOLS_INIT_EVENT_TRACKER",
    57: "UVM_TOOLS_SET_NOTIFICATION_THRESHOLD",
    58: "UVM_TOOLS_EVENT_QUEUE_ENABLE_EVENTS",
    59: "UVM_TOOLS_EVENT_QUEUE_DISABLE_EVENTS",
    60: "UVM_TOOLS_ENABLE_COUNTERS",
    61: "UVM_TOOLS_DISABLE_COUNTERS",
    62: "UVM_TOOLS_READ_PROCESS_MEMORY",
    63: "UVM_TOOLS_WRITE_PROCESS_MEMORY",
    64: "UVM_TOOLS_GET_PROCESSOR_UUID_TABLE",
    65: "UVM_MAP_DYNAMIC_PARALLELISM_REGION",
    66: "UVM_UNMAP_EXTERNAL",
    67: "UVM_TOOLS_FLUSH_EVENTS",
    68: "UVM_ALLOC_SEMAPHORE_POOL",
    69: "UVM_CLEAN_UP_ZOMBIE_RESOURCES",
    70: "UVM_PAGEABLE_MEM_ACCESS_ON_GPU",
    71: "UVM_POPULATE_PAGEABLE",
    72: "UVM_VALIDATE_VA_RANGE",
    73: "UVM_CREATE_EXTERNAL_RANGE",
    74: "UVM_MAP_EXTERNAL_SPARSE",
    75: "UVM_MM_INITIALIZE",
    79: "UVM_CLEAR_ALL_ACCESS_COUNTERS",
    80: "UVM_DISCARD",
}
UVM_INITIALIZE = 0x30000001

# RM object classes (hClass of RM_ALLOC) -> (name, meaning)
CLASSES: dict[int, tuple[str, str | None]] = {
    0x0000: ("NV01_ROOT", CONTEXT_CREATE),
    0x0001: ("NV01_ROOT_NON_PRIV", CONTEXT_CREATE),
    0x0041: ("NV01_ROOT_CLIENT", CONTEXT_CREATE),
    0x0080: ("NV01_DEVICE_0", DEVICE_OPEN),
    0x2080: ("NV20_SUBDEVICE_0", DEVICE_OPEN),
    0x003E: ("NV01_MEMORY_SYSTEM", HOST_MEMORY_ALLOC),
    0x003F: ("NV01_MEMORY_LOCAL_PRIVILEGED", GPU_MEMORY_ALLOC),
    0x0040: ("NV01_MEMORY_LOCAL_USER", GPU_MEMORY_ALLOC),
    0x0070: ("NV01_MEMORY_VIRTUAL", None),
    0x0071: ("NV01_MEMORY_SYSTEM_OS_DESCRIPTOR", HOST_MEMORY_ALLOC),
    0x00C2: ("NV01_MEMORY_LOCAL_PHYSICAL", GPU_MEMORY_ALLOC),
    0x00F8: ("NV_MEMORY_FABRIC", GPU_MEMORY_ALLOC),
    0x50A0: ("NV50_MEMORY_VIRTUAL", None),
    0x90F1: ("FERMI_VASPACE_A", ADDRESS_SPACE_CREATE),
    0xA06C: ("KEPLER_CHANNEL_GROUP_A", CHANNEL_CREATE),
    0x506F: ("NV50_CHANNEL_GPFIFO", CHANNEL_CREATE),
    0x906F: ("GF100_CHANNEL_GPFIFO", CHANNEL_CREATE),
    0xA06F: ("KEPLER_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xA16F: ("KEPLER_CHANNEL_GPFIFO_B", CHANNEL_CREATE),
    0xB06F: ("MAXWELL_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC06F: ("PASCAL_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC36F: ("VOLTA_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC46F: ("TURING_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC56F: ("AMPERE_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC86F: ("HOPPER_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xC96F: ("BLACKWELL_CHANNEL_GPFIFO_A", CHANNEL_CREATE),
    0xCA6F: ("BLACKWELL_CHANNEL_GPFIFO_B", CHANNEL_CREATE),
    0xA0C0: ("KEPLER_COMPUTE_A", COMPUTE_ENGINE),
    0xA1C0: ("KEPLER_COMPUTE_B", COMPUTE_ENGINE),
    0xB0C0: ("MAXWELL_COMPUTE_A", COMPUTE_ENGINE),
    0xB1C0: ("MAXWELL_COMPUTE_B", COMPUTE_ENGINE),
    0xC0C0: ("PASCAL_COMPUTE_A", COMPUTE_ENGINE),
    0xC1C0: ("PASCAL_COMPUTE_B", COMPUTE_ENGINE),
    0xC3C0: ("VOLTA_COMPUTE_A", COMPUTE_ENGINE),
    0xC4C0: ("VOLTA_COMPUTE_B", COMPUTE_ENGINE),
    0xC5C0: ("TURING_COMPUTE_A", COMPUTE_ENGINE),
    0xC6C0: ("AMPERE_COMPUTE_A", COMPUTE_ENGINE),
    0xC7C0: ("AMPERE_COMPUTE_B", COMPUTE_ENGINE),
    0xC9C0: ("ADA_COMPUTE_A", COMPUTE_ENGINE),
    0xCBC0: ("HOPPER_COMPUTE_A", COMPUTE_ENGINE),
    0xCDC0: ("BLACKWELL_COMPUTE_A", COMPUTE_ENGINE),
    0xCEC0: ("BLACKWELL_COMPUTE_B", COMPUTE_ENGINE),
    0x900E: ("MPS_COMPUTE", COMPUTE_ENGINE),
    0xA0B5: ("KEPLER_DMA_COPY_A", COPY_ENGINE),
    0xB0B5: ("MAXWELL_DMA_COPY_A", COPY_ENGINE),
    0xC0B5: ("PASCAL_DMA_COPY_A", COPY_ENGINE),
    0xC1B5: ("PASCAL_DMA_COPY_B", COPY_ENGINE),
    0xC3B5: ("VOLTA_DMA_COPY_A", COPY_ENGINE),
    0xC5B5: ("TURING_DMA_COPY_A", COPY_ENGINE),
    0xC6B5: ("AMPERE_DMA_COPY_A", COPY_ENGINE),
    0xC7B5: ("AMPERE_DMA_COPY_B", COPY_ENGINE),
    0xC8B5: ("HOPPER_DMA_COPY_A", COPY_ENGINE),
    0xC9B5: ("BLACKWELL_DMA_COPY_A", COPY_ENGINE),
    0xCAB5: ("BLACKWELL_DMA_COPY_B", COPY_ENGINE),
}

# commands whose meaning does not depend on the detail word
_COMMAND_MEANINGS = {
    ("nvidia", 200): DRIVER_PROBE,
    ("nvidia", 210): DRIVER_PROBE,
    ("nvidia", 0x27): GPU_MEMORY_ALLOC,
    ("nvidia", 0x4A): GPU_MEMORY_ALLOC,
    ("nvidia", 0x4E): GPU_MEMORY_MAP,
    ("nvidia-uvm", UVM_INITIALIZE): UVM_INIT,
    ("nvidia-uvm", 33): GPU_MEMORY_MAP,
}


def class_info(hclass: int) -> tuple[str, str | None]:
    """(name, meaning) of an RM object class; families not in the table are
    recognised by their low byte (c0 compute, 6f channel, b5 copy engine)."""
    known = CLASSES.get(hclass)
    if known is not None:
        return known
    low, high = hclass & 0xFF, hclass >> 8
    if hclass <= 0xFFFF and high >= 0xA0:
        if low == 0xC0:
            return f"COMPUTE_{hclass:04X}", COMPUTE_ENGINE
        if low == 0x6F:
            return f"CHANNEL_GPFIFO_{hclass:04X}", CHANNEL_CREATE
        if low == 0xB5:
            return f"DMA_COPY_{hclass:04X}", COPY_ENGINE
    return f"{hclass:#x}", None


def command_name(device_kind: str, nr: int) -> str | None:
    if device_kind == "nvidia":
        return FRONTEND.get(nr)
    if device_kind == "nvidia-uvm":
        return UVM.get(nr)
    return None


def decode(device_kind: str, nr: int, detail: int) -> dict:
    """What one GPU ioctl is: {"name", "class", "meaning"} (each may be None).

    `class` is set for RM_ALLOC only (the object class allocated); `meaning`
    is one of MEANINGS.
    """
    name = command_name(device_kind, nr)
    cls = None
    meaning = _COMMAND_MEANINGS.get((device_kind, nr))
    if device_kind == "nvidia" and nr == RM_ALLOC:
        cls, meaning = class_info(detail)
    return {"name": name, "class": cls, "meaning": meaning}


def device_node(device_kind: str, minor: int) -> str | None:
    """The usual /dev path of a GPU device, for display."""
    if device_kind == "nvidia":
        if minor == CTL_MINOR:
            return "/dev/nvidiactl"
        if minor == MODESET_MINOR:
            return "/dev/nvidia-modeset"
        if 0 <= minor <= MAX_GPU_MINOR:
            return f"/dev/nvidia{minor}"
        return None
    if device_kind == "nvidia-uvm":
        return {0: "/dev/nvidia-uvm", 1: "/dev/nvidia-uvm-tools"}.get(minor)
    if device_kind == "nvidia-caps":
        return f"/dev/nvidia-caps/nvidia-cap{minor}"
    return None
