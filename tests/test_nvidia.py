"""NVIDIA ioctl decoding: numbers from NVIDIA's open kernel module headers."""

from __future__ import annotations

import pytest

from agentprobe import nvidia
from agentprobe.nvidia import decode


@pytest.mark.parametrize("hclass, name, meaning", [
    (0x41, "NV01_ROOT_CLIENT", "context_create"),
    (0x00, "NV01_ROOT", "context_create"),
    (0x01, "NV01_ROOT_NON_PRIV", "context_create"),
    (0x80, "NV01_DEVICE_0", "device_open"),
    (0x2080, "NV20_SUBDEVICE_0", "device_open"),
    (0xC6C0, "AMPERE_COMPUTE_A", "compute_engine"),
    (0xCBC0, "HOPPER_COMPUTE_A", "compute_engine"),
    (0xA0C0, "KEPLER_COMPUTE_A", "compute_engine"),
    (0xC56F, "AMPERE_CHANNEL_GPFIFO_A", "channel_create"),
    (0xC86F, "HOPPER_CHANNEL_GPFIFO_A", "channel_create"),
    (0x40, "NV01_MEMORY_LOCAL_USER", "gpu_memory_alloc"),
    (0x3E, "NV01_MEMORY_SYSTEM", "host_memory_alloc"),
    (0x90F1, "FERMI_VASPACE_A", "address_space_create"),
    (0xC8B5, "HOPPER_DMA_COPY_A", "copy_engine"),
])
def test_rm_alloc_classes(hclass, name, meaning):
    assert decode("nvidia", 0x2B, hclass) == {"name": "RM_ALLOC", "class": name, "meaning": meaning}


@pytest.mark.parametrize("hclass, name, meaning", [
    (0xD0C0, "COMPUTE_D0C0", "compute_engine"),       # a future *_COMPUTE_* class
    (0xCB6F, "CHANNEL_GPFIFO_CB6F", "channel_create"),
    (0xCCB5, "DMA_COPY_CCB5", "copy_engine"),
    (0x12C0, "0x12c0", None),                          # low byte c0 but not a GPU-generation class
    (0x1234, "0x1234", None),
])
def test_unknown_classes_by_family(hclass, name, meaning):
    assert decode("nvidia", 0x2B, hclass) == {"name": "RM_ALLOC", "class": name, "meaning": meaning}


@pytest.mark.parametrize("nr, name, meaning", [
    (200, "CARD_INFO", "driver_probe"),
    (201, "REGISTER_FD", None),
    (206, "ALLOC_OS_EVENT", None),
    (207, "FREE_OS_EVENT", None),
    (209, "STATUS_CODE", None),
    (210, "CHECK_VERSION_STR", "driver_probe"),
    (211, "IOCTL_XFER_CMD", None),
    (212, "ATTACH_GPUS_TO_FD", None),
    (214, "SYS_PARAMS", None),
    (217, "EXPORT_TO_DMABUF_FD", None),
    (218, "WAIT_OPEN_COMPLETE", None),
    (0x27, "RM_ALLOC_MEMORY", "gpu_memory_alloc"),
    (0x28, "RM_ALLOC_OBJECT", None),
    (0x29, "RM_FREE", None),
    (0x34, "RM_DUP_OBJECT", None),
    (0x35, "RM_SHARE", None),
    (0x4A, "RM_VID_HEAP_CONTROL", "gpu_memory_alloc"),
    (0x4E, "RM_MAP_MEMORY", "gpu_memory_map"),
    (0x4F, "RM_UNMAP_MEMORY", None),
])
def test_frontend_commands(nr, name, meaning):
    assert decode("nvidia", nr, 0) == {"name": name, "class": None, "meaning": meaning}


def test_rm_control_keeps_no_class():
    # detail is the control command (here NV2080_CTRL_CMD_GPU_GET_INFO_V2), not a class
    assert decode("nvidia", 0x2A, 0x20800102) == {"name": "RM_CONTROL", "class": None, "meaning": None}


@pytest.mark.parametrize("nr, name, meaning", [
    (0x30000001, "UVM_INITIALIZE", "uvm_init"),
    (0x30000002, "UVM_DEINITIALIZE", None),
    (25, "UVM_REGISTER_GPU_VASPACE", None),
    (27, "UVM_REGISTER_CHANNEL", None),
    (33, "UVM_MAP_EXTERNAL_ALLOCATION", "gpu_memory_map"),
    (34, "UVM_FREE", None),
    (37, "UVM_REGISTER_GPU", None),
    (51, "UVM_MIGRATE", None),
    (73, "UVM_CREATE_EXTERNAL_RANGE", None),
    (75, "UVM_MM_INITIALIZE", None),
])
def test_uvm_commands(nr, name, meaning):
    assert decode("nvidia-uvm", nr, 0) == {"name": name, "class": None, "meaning": meaning}


def test_numbers_mean_nothing_on_the_other_device():
    # UVM numbers are raw, frontend numbers are _IOC_NR: 0x2B (43) on nvidia-uvm is not RM_ALLOC
    assert decode("nvidia-uvm", 0x2B, 0x41) == {"name": "UVM_UNSET_PREFERRED_LOCATION", "class": None,
                                                "meaning": None}
    assert decode("nvidia", 0x30000001, 0) == {"name": None, "class": None, "meaning": None}
    assert decode("nvidia-caps", 200, 0) == {"name": None, "class": None, "meaning": None}


def test_unknown_command():
    assert decode("nvidia", 0x99, 0) == {"name": None, "class": None, "meaning": None}


def test_every_meaning_is_in_the_vocabulary():
    meanings = {m for _, m in nvidia.CLASSES.values()} | set(nvidia._COMMAND_MEANINGS.values())
    assert meanings - {None} <= set(nvidia.MEANINGS)


@pytest.mark.parametrize("kind, minor, path", [
    ("nvidia", 255, "/dev/nvidiactl"),
    ("nvidia", 254, "/dev/nvidia-modeset"),
    ("nvidia", 0, "/dev/nvidia0"),
    ("nvidia", 247, "/dev/nvidia247"),
    ("nvidia", 250, None),
    ("nvidia-uvm", 0, "/dev/nvidia-uvm"),
    ("nvidia-uvm", 1, "/dev/nvidia-uvm-tools"),
    ("nvidia-caps", 1, "/dev/nvidia-caps/nvidia-cap1"),
    ("other", 0, None),
])
def test_device_node(kind, minor, path):
    assert nvidia.device_node(kind, minor) == path
