from kvstore.demo.demo import demo

demo()
