"""Evaluation: attacks on releases, authorized fine-tuning, mask-recovery audits, reports."""
