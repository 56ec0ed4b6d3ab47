from benchmarks.transfer.run import main

main()
