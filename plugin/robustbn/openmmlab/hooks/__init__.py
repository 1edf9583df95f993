from .buffer_check import BufferConsistencyHook, buffer_mismatches
from .shrinkage_monitor import ShrinkageMonitorHook

__all__ = ['BufferConsistencyHook', 'ShrinkageMonitorHook', 'buffer_mismatches']
