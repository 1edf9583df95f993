"""Adversarial evaluation: ``AdversarialEvalHook``; attacks and their evaluation live in
``robustbn.openmmlab.adversarial.attacks`` / ``.evaluate`` (imported on use: they need
torchattacks)."""
from .hook import AdversarialEvalHook

__all__ = ['AdversarialEvalHook']
