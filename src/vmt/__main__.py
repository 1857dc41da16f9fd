from vmt.cli import main

raise SystemExit(main())
