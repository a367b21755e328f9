"""The gateway at the HPC edge: routes by port, admits only compute nodes, carries the client address."""
