"""agentprobe: kernel-level (eBPF) security monitoring for AI agents."""

__version__ = "0.1.0"
