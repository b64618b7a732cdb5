from .daemon.service import main

raise SystemExit(main())
