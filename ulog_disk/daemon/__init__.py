"""dm-ulogd: the effects performed, the request loop and its threads, the program."""
