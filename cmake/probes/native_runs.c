/* Compiled with the flags llama.cpp's CPU backend uses (-march=native): exits 0 when a binary
   built with them runs on this machine (the compiler may enable features the OS or hypervisor
   has switched off, which then die with SIGILL). */
#include <stdio.h>

static float dot(const float * a, const float * b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

int main(void) {
    float a[256], b[256];
    for (int i = 0; i < 256; ++i) {
        a[i] = (float) (i % 7);
        b[i] = (float) (i % 5);
    }
    volatile float s = dot(a, b, 256);
    return s > 0.0f ? 0 : 1;
}
