"""The demo: a synthetic chest-CT dataset, a lung-segmentation job, and what happened to every byte."""
