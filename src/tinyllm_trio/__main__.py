from tinyllm_trio.cli import main

raise SystemExit(main())
