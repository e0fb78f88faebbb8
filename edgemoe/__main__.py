from edgemoe.cli import main

raise SystemExit(main())
