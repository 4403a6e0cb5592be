from sam3stream.cli import main

raise SystemExit(main())
