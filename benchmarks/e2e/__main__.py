from benchmarks.e2e.run import main

main()
