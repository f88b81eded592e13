def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
def greet(name):
    print(f'hello {name}')


if __name__ == '__main__':
    greet('world')
