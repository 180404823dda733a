"""Launchers (XManager, gcloud TPU VMs) and the sweep spec that they share with experiments/sweep.py."""
