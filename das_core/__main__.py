from das_core.cli import main

raise SystemExit(main())
