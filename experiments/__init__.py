"""The experiments beside the trainers; run each as python3 -m experiments.STUDY.SCRIPT."""
