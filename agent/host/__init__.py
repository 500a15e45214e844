"""What the agent asks of the machine: btrfs-progs and the kernel (``btrfs``), the Docker
Engine (``dockerd``), and the plain records both return (``records``). The only room that
starts processes, calls ioctls or speaks to Docker."""
