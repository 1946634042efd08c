from biprop_hpc.cli import main

raise SystemExit(main())
