from layerfs.cli import main

main()
