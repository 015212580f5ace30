"""Storage: the JuiceFS volume (`juicefs`) and each sprite's loop-mounted disk (`disk`)."""
