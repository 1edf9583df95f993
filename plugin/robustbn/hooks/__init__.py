from .shrinkage_monitor import ShrinkageMonitorHook

__all__ = ['ShrinkageMonitorHook']
