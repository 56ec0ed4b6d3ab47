from benchmarks.overlap.run import main

main()
